"""State dicts: checked to be names -> tensors, read from HF model folders, weight-norm pairs
checked, renamed and fused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .common import CheckpointError, short_repr
from .safetensors_io import memmap_safetensors, read_safetensors
from .torch_file import read_torch_file

# ------------------------------------------------------------------------------------- HF folders


def check_state_dict(source: str | Path, weights: Any, *, what: str = "weights") -> dict[str, Any]:
    """`weights` as a plain dict after checking it is a state dict: string keys, array values.

    Arrays are numpy arrays or anything with a `shape` (e.g. MLX arrays of a converted cache).
    """
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{source}: {what} should be a mapping of names to tensors, found "
                              f"{type(weights).__name__}; the file is not a model checkpoint")
    out = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: {what} has a non-string key {short_repr(key)}")
        if not isinstance(getattr(value, "shape", None), tuple):
            raise CheckpointError(f"{source}: {what}[{key[:80]!r}] is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_hf_weights(folder: str | Path, *, mapped: bool = False) -> dict[str, np.ndarray]:
    """State dict of a Hugging Face model folder: `model.safetensors` if present, else `pytorch_model.bin`.

    Weight-norm tensors are returned under the legacy `weight_g`/`weight_v` names whichever
    naming the file used. `mapped`: a `model.safetensors` comes as memory-mapped views
    (`memmap_safetensors`), read only where a tensor is used.
    """
    folder = Path(folder)
    st = folder / "model.safetensors"
    bin_ = folder / "pytorch_model.bin"
    if st.exists():
        if not st.is_file():
            raise CheckpointError(f"{st}: is not a file")
        weights = memmap_safetensors(st) if mapped else read_safetensors(st)
        source = st
    elif bin_.exists():
        if not bin_.is_file():
            raise CheckpointError(f"{bin_}: is not a file")
        weights = read_torch_file(bin_).obj
        source = bin_
    else:
        sharded = [p.name for p in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json")
                   if p.exists()]
        hint = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
        raise FileNotFoundError(
            f"{folder}: no model.safetensors or pytorch_model.bin{hint}; "
            "copy the model folder from the PrimeSpeech download into place"
        )
    weights = normalize_weight_norm_names(check_state_dict(source, weights, what="the state dict"))
    check_weight_norm_pairs(source, weights)
    return weights


def check_weight_norm_pairs(source: str | Path, weights: Mapping[str, Any], *, dim: int | None = None) -> None:
    """Every `<name>.weight_v` has its `<name>.weight_g` and the other way round, and g has v's rank
    with every axis 1 except at most one equal to v's (axis `dim` if given): so `fuse_weight_norm`
    broadcasts g over v without growing anything."""
    for key in weights:
        if not key.endswith((".weight_g", ".weight_v")):
            continue
        base = key[:-len("_g")]
        g, v = weights.get(base + "_g"), weights.get(base + "_v")
        if g is None or v is None:
            raise CheckpointError(f"{source}: {base} has only one of weight_g/weight_v; the file is damaged")
        if key.endswith("_g"):
            continue
        g_shape, v_shape = tuple(g.shape), tuple(v.shape)
        ok = (len(g_shape) == len(v_shape) >= 1
              and all(gs in (1, vs) for gs, vs in zip(g_shape, v_shape))
              and sum(gs != 1 for gs in g_shape) <= 1
              and (dim is None or all(gs == 1 for i, gs in enumerate(g_shape) if i != dim % len(v_shape))))
        if not ok:
            raise CheckpointError(f"{source}: {base}.weight_g has shape {g_shape}, which does not fit weight_v "
                                  f"{v_shape} (one norm per {'slice' if dim is None else f'index of axis {dim}'}); "
                                  "the file is damaged")


_PARAMETRIZED = {
    ".parametrizations.weight.original0": ".weight_g",
    ".parametrizations.weight.original1": ".weight_v",
}


def normalize_weight_norm_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map `parametrizations.weight.original0/1` (torch >= 2.1 API) to `weight_g`/`weight_v`."""
    out = {}
    for key, value in weights.items():
        for new_suffix, old_suffix in _PARAMETRIZED.items():
            if key.endswith(new_suffix):
                key = key[: -len(new_suffix)] + old_suffix
                break
        out[key] = value
    return out


def fuse_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray, dim: int = 0) -> np.ndarray:
    """`w = g * v / ||v||` with the norm over every axis except `dim` (torch `weight_norm` semantics).

    `dim=0` is torch's default (per output channel of Conv1d, per input channel of ConvTranspose1d);
    HuBERT's positional convolution uses `dim=2`. Computed in float32; no epsilon, as torch.
    """
    v = weight_v.astype(np.float32)
    g = weight_g.astype(np.float32)
    axes = tuple(a for a in range(v.ndim) if a != dim % v.ndim)
    norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
    return (g * v / norm).astype(np.float32)


