"""Key/value caches for the autoregressive GPT, in mlx-lm's shape (`update_and_fetch`, `offset`).

`KVCache` grows its buffers in fixed blocks and writes each new step into a slice, so a decode step
costs one small slice update instead of copying the whole history (`ConcatKVCache`, kept as the
baseline for benchmarks and as an independent implementation for tests).
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["KVCache", "ConcatKVCache", "ScatterKVCache", "make_cache", "COMPILE_BLOCK"]

# compiled decode: fixed-capacity K/V buffers grow in buckets of this many positions (one re-trace
# per bucket; t2s_generate's single-row loop and t2s_batch's rows)
COMPILE_BLOCK = 256


class KVCache:
    """Per-layer K/V store, preallocated in blocks of `step` positions.

    Layout of keys and values: (B, heads, T, head_dim). `offset` is the number of valid positions.
    """

    def __init__(self, step: int = 256):
        if step < 1:
            raise ValueError(f"KVCache step must be >= 1, got {step}")
        self.step = step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, H, L, D) and return the whole valid history (B, H, offset, D)."""
        prev = self.offset
        needed = prev + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            # grow to the next multiple of `step` so that most decode steps allocate nothing
            capacity = ((needed + self.step - 1) // self.step) * self.step
            B, H, _, Dk = keys.shape
            new_k = mx.zeros((B, H, capacity, Dk), dtype=keys.dtype)
            new_v = mx.zeros((B, H, capacity, values.shape[3]), dtype=values.dtype)
            if self.keys is not None and prev > 0:
                new_k[..., :prev, :] = self.keys[..., :prev, :]
                new_v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., prev:needed, :] = keys
        self.values[..., prev:needed, :] = values
        self.offset = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays to evaluate together with a step's outputs (for `mx.eval`/`mx.async_eval`)."""
        if self.keys is None:
            return ()
        return self.keys, self.values


class ConcatKVCache:
    """Reference cache that concatenates on every step (O(T) copy per step); same interface."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, H, L, D) and return the whole history."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.offset = self.keys.shape[2]
        return self.keys, self.values

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays to evaluate together with a step's outputs."""
        if self.keys is None:
            return ()
        return self.keys, self.values


class ScatterKVCache:
    """One layer's fixed-capacity (B, H, capacity, D) buffers in a batched decode step: each row writes
    its new position at its own offset (`offsets` (B,)); the whole buffers come back, masked by the caller."""

    def __init__(self, keys: mx.array, values: mx.array, offsets: mx.array, fused: bool = False):
        self.keys, self.values, self.offsets = keys, values, offsets
        self.fused_lengths = offsets + 1 if fused else None  # for the fused attention kernel

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, _, D = keys.shape
        where = mx.broadcast_to(self.offsets[:, None, None, None], (B, H, 1, D))
        self.keys = mx.put_along_axis(self.keys, where, keys, axis=2)
        self.values = mx.put_along_axis(self.values, where, values, axis=2)
        return self.keys, self.values


def make_cache(n_layers: int, kind: str = "step", step: int = 256) -> list[KVCache] | list[ConcatKVCache]:
    """One cache per layer. `kind` is "step" (block-allocated, default) or "concat" (baseline)."""
    if kind == "step":
        return [KVCache(step) for _ in range(n_layers)]
    if kind == "concat":
        return [ConcatKVCache() for _ in range(n_layers)]
    raise ValueError(f"unknown KV cache kind {kind!r}; use 'step' or 'concat'")
