"""What every stage's model shares: a typed config read from a file's dict, and strict loading.

A model file holds its graph, its config's ranges and `sanitize`; it calls these two for the rest,
as mlx-lm's models do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..weights import CheckpointError, read_json_config, to_plain

__all__ = ["ModelConfig", "load_strict", "read_hf_config"]

C = TypeVar("C", bound="ModelConfig")


class ModelConfig:
    """Base of a stage's config dataclass: `from_dict` keeps the keys the dataclass declares and
    ignores the rest (forks add keys; the file's other sections are not ours). Range checks stay in
    each subclass's `__post_init__`, which runs before anything is sized from the config."""

    @classmethod
    def select(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The part of the file's config that holds this stage's keys (default: all of it)."""
        return config

    @classmethod
    def from_dict(cls: type[C], config: Any) -> C:
        if not isinstance(config, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping, found {type(config).__name__}")
        section = cls.select(to_plain(config))
        if not isinstance(section, Mapping):
            raise ValueError(f"{cls.__name__}: expected a mapping, found {type(section).__name__}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in section.items() if k in names})


def read_hf_config(folder: Path, cls: type[C]) -> C:
    """`cls` from an HF folder's config.json; a bad file is a CheckpointError naming it."""
    path = Path(folder) / "config.json"
    config = read_json_config(path)  # FileNotFoundError / CheckpointError naming the file
    try:
        return cls.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}; restore the original config.json") from None


def _listing(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''} ({len(keys)})"


def load_strict(model: nn.Module, weights: dict[str, Any], source: str | Path, *, what: str, hint: str,
                dtype: mx.Dtype | None = None) -> int:
    """Load sanitized `weights` into `model`: every parameter must come from them, with its shape.

    Names and shapes are compared before any MLX array exists, so a mismatch allocates nothing; then
    tensors are converted one at a time and each numpy source dropped at once (`weights` is emptied),
    so loading never holds two copies of a large model. Returns the number of tensors.

    Raises:
        CheckpointError: naming `source`, saying what differs, then `hint` (where the right file is).
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: the {what} weights do not match the model: missing {_listing(missing)}, "
                              f"unexpected {_listing(unexpected)}; {hint}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(weights[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{source}: {len(bad)} {what} tensors have unexpected shapes, e.g. {k}: "
                              f"{tuple(weights[k].shape)} instead of {tuple(expected[k].shape)}; {hint}")
    loaded = []
    for key in list(weights):
        value = weights.pop(key)
        value = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
        if dtype is not None:
            value = value.astype(dtype)
        mx.eval(value)
        loaded.append((key, value))
    model.load_weights(loaded, strict=True)
    mx.eval(model.parameters())
    return len(loaded)
