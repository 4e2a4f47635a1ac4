"""Which models go through the convert-once cache (`weights.cache`): the GPT and SoVITS checkpoints of
every voice, converted with their own loaders and savers. The HF encoders use
`weights.cache.load_hf_weights_cached` from their model files."""

from __future__ import annotations

from pathlib import Path

from .models.sovits import SoVITS, load_sovits, save_sovits_safetensors
from .models.t2s_generate import T2S
from .models.t2s_io import load_t2s, save_t2s_safetensors
from .weights.cache import load_cached

__all__ = ["load_sovits_cached", "load_t2s_cached"]


def load_t2s_cached(source: Path) -> T2S:
    return load_cached("t2s", source, load_t2s, save_t2s_safetensors)


def load_sovits_cached(source: Path) -> SoVITS:
    return load_cached("sovits", source, load_sovits, save_sovits_safetensors)
