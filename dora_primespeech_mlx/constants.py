"""Values more than one layer needs, defined once. Nothing here imports from the package."""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_RATE = 32000  # SoVITS v2 output and reference rate (Hz); the node's `audio` is at this rate
HUBERT_RATE = 16000  # what chinese-hubert-base hears (Hz)
MAX_DECODE_STEPS = 1500  # upstream's hard cap on GPT steps per sentence: 60 s of audio at 25 tokens/s
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # fp32 is the reference; the others are opt-in
DEFAULT_MODEL_DIR = "~/.dora/models/primespeech"  # dora-primespeech's $PRIMESPEECH_MODEL_DIR default
CACHE_ENV = "DORA_PRIMESPEECH_MLX_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/dora-primespeech-mlx"


def cache_home() -> Path:
    """Root of everything this package caches (conversions, Core ML packages, the smoke voice):
    `$DORA_PRIMESPEECH_MLX_CACHE`, else ~/.cache/dora-primespeech-mlx; `~` and `$VARS` expanded."""
    return Path(os.path.expandvars(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)))
