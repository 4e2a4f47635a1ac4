"""Lower precisions for the t2s GPT, applied in place to a built graph: `apply_precision`.

The names (`constants.PRECISIONS`) live apart so that the node checks them without importing MLX.

Opt-in: fp32 is the parity-tested default. Bounds per mode are held by tests/test_precision.py and
measured by benchmarks/bench_precision.py.
"""

from __future__ import annotations

from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from ..constants import PRECISIONS
from .t2s import SinePositionalEmbedding, T2SGraph, TransformerEncoderLayer

__all__ = ["apply_precision"]

# 8-bit: per-group affine quantisation of every Linear (mlx.nn.quantize), 64 weights per group
INT8_GROUP_SIZE = 64

G = TypeVar("G", bound=T2SGraph)


def apply_precision(model: G, precision: str) -> G:
    """Run `model` in a lower precision, in place: "fp16"/"bf16" store the Linear and embedding
    weights in that type and run the matmuls and K/V cache in it, while LayerNorm parameters, the
    residual stream, positions and logits (so sampling) stay float32; "int8" quantises every Linear
    to 8 bits (group size 64) over fp16 activations. "fp32" (the default) changes nothing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    dtype = mx.bfloat16 if precision == "bf16" else mx.float16
    keep = (nn.LayerNorm, SinePositionalEmbedding)

    def cast(module: nn.Module) -> None:
        if isinstance(module, keep):
            return
        for name, value in list(module.items()):
            if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
                module[name] = value.astype(dtype)

    for _, module in model.named_modules():
        cast(module)
    if precision == "int8":
        nn.quantize(model, group_size=INT8_GROUP_SIZE, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    for _, module in model.named_modules():
        if isinstance(module, (TransformerEncoderLayer, T2SGraph)):
            module.compute_dtype = dtype
    model.precision = precision
    mx.eval(model.parameters())
    model._compiled_steps.clear()  # traced at the old dtypes
    model._batch_steps.clear()
    return model
