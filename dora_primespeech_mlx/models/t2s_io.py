"""Reading and writing the t2s GPT: `load_t2s` (a GPT-SoVITS `.ckpt` or its `.safetensors` cache),
`save_t2s_safetensors`, `convert_t2s`.

Its own file because loading sits above the rest of the stage: it builds the decoding `T2S`
(`t2s_generate`) and applies a precision (`t2s_precision`), both of which import the model file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..weights import CheckpointError, check_state_dict, plain_config, read_torch_file
from .attention_kernels import fused_attention_available
from .base import load_strict
from .t2s import T2SConfig, T2SGraph, sanitize
from .t2s_generate import T2S
from .t2s_precision import apply_precision

logger = logging.getLogger(__name__)

__all__ = ["load_t2s", "save_t2s_safetensors", "convert_t2s", "SAFETENSORS_FORMAT"]

SAFETENSORS_FORMAT = "dora-primespeech-mlx/t2s-v1"


def _read_source(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, config) from a GPT `.ckpt` or a converted `.safetensors` cache."""
    if path.suffix == ".safetensors":
        weights, metadata = mx.load(str(path), return_metadata=True)
        if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
            raise CheckpointError(
                f"{path}: not a t2s cache written by save_t2s_safetensors (metadata format "
                f"{metadata.get('format')!r}); convert the GPT .ckpt with convert_t2s()"
            )
        return weights, json.loads(metadata["config"])
    obj = read_torch_file(path).obj
    if not isinstance(obj, dict) or "weight" not in obj or "config" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: a GPT .ckpt holds 'weight' and 'config' (GPT_weights/*.ckpt from GPT-SoVITS), found {keys}"
        )
    return check_state_dict(path, obj["weight"]), plain_config(obj["config"], path)


def load_t2s(path: str | Path, *, dtype: mx.Dtype = mx.float32, compile: bool | None = None,
             precision: str = "fp32") -> T2S:
    """Load the t2s GPT from a GPT-SoVITS `.ckpt` (no torch needed) or its `.safetensors` cache.

    Hyper-parameters come from the file's own config. Loading is strict: a missing, unexpected or
    mis-shaped tensor raises `CheckpointError` naming the file. `compile` sets the decode default
    (`T2S.compile_decode`): True decodes through the `mx.compile`d step, False eagerly, None (default)
    compiles when the default device is a GPU and stays eager on the CPU. `precision` as in
    `apply_precision` (opt-in lower precisions; fp32 by default).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"t2s weights not found: {path} (pass GPT_weights/<voice>.ckpt or a cache from convert_t2s())"
        )
    weights, config = _read_source(path)
    try:
        cfg = T2SConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad t2s config ({exc})") from None
    weights = sanitize(weights)  # rebinds, so load_strict's popping frees each source tensor
    cfg.check_weights(weights, path)
    model = T2S(cfg)
    n_tensors = load_strict(model, weights, path, what="t2s GPT", dtype=dtype,
                            hint=f"the file is not a GPT-SoVITS GPT checkpoint for {asdict(cfg)}, or it is damaged")
    model.eval()
    # measured (benchmarks/bench_t2s.py): compiled decode is ~22% faster per token on an H100 and
    # exact, but slower on mlx-cpu, where the static cache's padded attention outweighs the saved
    # graph building; the first compiled call pays a one-off JIT (~4 s on CUDA)
    model.compile_decode = mx.default_device().type == mx.gpu if compile is None else bool(compile)
    apply_precision(model, precision)
    model.fused_attention = fused_attention_available(cfg.head_dim, model.compute_dtype)
    logger.info("loaded t2s GPT from %s (%d tensors, %d layers)", path, n_tensors, cfg.n_layer)
    return model


def save_t2s_safetensors(model: T2SGraph, path: str | Path, *, dtype: mx.Dtype = mx.float16) -> Path:
    """Write `model`'s weights (fp16 by default, as the `.ckpt` stores them) and config to a cache file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(asdict(model.config))}
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    return path


def convert_t2s(src: str | Path, dst: str | Path) -> Path:
    """Convert a GPT `.ckpt` to the `.safetensors` cache that `load_t2s` reads faster."""
    return save_t2s_safetensors(load_t2s(src), dst)
