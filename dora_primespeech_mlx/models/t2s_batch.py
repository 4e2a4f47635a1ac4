"""Batched decode with the t2s GPT: several `[text; prompt]` rows through one decode loop.

`BatchDecoder` is step-wise: rows join (`add`) and leave (`remove`, or when they stop) between steps,
each with its own sampling settings, seed and step cap; one `step()` runs the 24 layers once for
every active row. A row's tokens are the ones `T2S.decode_steps` gives for it alone: the same
prefill, the same per-row random stream (its own key, split once per step exactly as the single
loop splits it), the same stop tests. Only floating-point rounding of the batched matmuls differs,
so greedy tokens agree wherever the single decode's top-1/top-2 logit gap exceeds that rounding.

Layout: one fixed-capacity K/V buffer per layer, (B, H, capacity, head_dim), rows left-aligned; row
b writes its new position at its own offset (a scatter) and attends to positions `<= offset[b]`
through a (B, 1, 1, capacity) mask. Capacity grows in `COMPILE_BLOCK`s, so a compiled step re-traces
once per (rows, block) shape. Like the single loop, step n+1 is queued before step n's tokens are
read (one host sync per step for all rows); a row that stopped at step n costs one wasted row-step.

`T2S.generate_batch` (in `t2s_generate`) is the simple front: all rows in, tokens per row out.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..constants import MAX_DECODE_STEPS
from .cache import COMPILE_BLOCK, ScatterKVCache, make_cache
from .decode_kernels import fused_decode_logits, fused_decode_mode
from .sample_utils import MIN_STEPS_BEFORE_EOS, RowSampling, sample_rows, seen_mask

__all__ = ["BatchDecoder", "RowSampling", "BatchStep", "MAX_BATCH_STEPS"]

# compiled batched steps kept per model (one per row-settings tuple), least recently used dropped
MAX_BATCH_STEPS = 16


@dataclass(frozen=True)
class BatchStep:
    """One row's sample at one step (the fields of `t2s_generate.DecodeStep`, plus the row)."""

    row: int
    index: int
    token: int
    stop_reason: str | None


@dataclass
class _Row:
    row_id: int
    sampling: RowSampling
    n_text: int  # text positions; the audio position of cache slot s is s - n_text
    n_steps: int  # step cap
    index: int = 0  # the step whose sample is pending
    length: int = 0  # cache slots written (the next write goes to slot `length`)
    extra: dict = field(default_factory=dict)


def _grow(buf: mx.array, capacity: int) -> mx.array:
    B, H, T, D = buf.shape
    if T >= capacity:
        return buf
    return mx.concatenate([buf, mx.zeros((B, H, capacity - T, D), dtype=buf.dtype)], axis=2)


class BatchDecoder:
    """Step-wise batched decoding over one `T2S` model (owner thread only, like every MLX call)."""

    def __init__(self, model, *, compile: bool | None = None):
        self.model = model
        self.compiled = model.compile_decode if compile is None else bool(compile)
        self._rows: list[_Row] = []
        self._next_id = 0
        self._capacity = 0
        self._keys: list[mx.array] = []  # per layer (B, H, capacity, D)
        self._values: list[mx.array] = []
        self._token = self._packed = self._seen = None  # (B,), (B, 2), (B, V): the pending step
        self._rng: list[mx.array] = []  # per-row random keys
        self._fns: dict[tuple, object] = {}

    # ------------------------------------------------------------------------------- rows in/out

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def row_ids(self) -> list[int]:
        return [r.row_id for r in self._rows]

    def add(self, phone_ids: np.ndarray, bert: np.ndarray, prompt_tokens: np.ndarray, *, top_k: int | None = 5,
            top_p: float = 1.0, temperature: float = 1.0, repetition_penalty: float = 1.35,
            max_new_tokens: int | None = None, seed: int | None = None) -> int:
        """Prefill one row (alone) and queue its first sample; returns its row id."""
        model, cfg = self.model, self.model.config
        n_steps = MAX_DECODE_STEPS if max_new_tokens is None else min(int(max_new_tokens), MAX_DECODE_STEPS)
        if n_steps <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: a row needs at least one step")
        settings = RowSampling(top_k, top_p, temperature, repetition_penalty)
        xy = model.embed(phone_ids, bert, prompt_tokens)
        n_text = int(np.asarray(phone_ids).size)
        length = xy.shape[1]
        cache = make_cache(cfg.n_layer, kind="step")
        logits = model._head(model(xy, model.prefill_mask(n_text, length - n_text), cache)[:, -1, :])
        prompt = np.asarray(prompt_tokens if prompt_tokens is not None else [], dtype=np.int32)
        seen = seen_mask(mx.array(prompt), cfg.vocab_size)[None]
        rng = mx.random.key(secrets.randbits(63) if seed is None else int(seed))
        token, stop, (rng,) = sample_rows(logits, seen, [rng], mx.array([False]), [settings], cfg.EOS)
        packed = mx.stack([token, stop.astype(mx.int32)], axis=1)  # (1, 2)
        model.ar_audio_position.table(length - n_text + n_steps)

        capacity = max(self._capacity, -(-(length + 1) // COMPILE_BLOCK) * COMPILE_BLOCK)
        self._resize(capacity)
        keys = [_grow(c.keys[:, :, :length, :], capacity) for c in cache]
        values = [_grow(c.values[:, :, :length, :], capacity) for c in cache]
        row = _Row(self._next_id, settings, n_text, n_steps, index=0, length=length)
        self._next_id += 1
        if self._rows:
            self._keys = [mx.concatenate([a, b]) for a, b in zip(self._keys, keys)]
            self._values = [mx.concatenate([a, b]) for a, b in zip(self._values, values)]
            self._token = mx.concatenate([self._token, token])
            self._packed = mx.concatenate([self._packed, packed])
            self._seen = mx.concatenate([self._seen, seen])
        else:
            self._keys, self._values, self._token, self._packed, self._seen = keys, values, token, packed, seen
        self._rows.append(row)
        self._rng.append(rng)
        mx.async_eval(self._packed)
        return row.row_id

    def remove(self, row_id: int) -> None:
        """Drop a row between steps (a cancelled request); unknown ids are ignored."""
        keep = [i for i, r in enumerate(self._rows) if r.row_id != row_id]
        if len(keep) != len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        self._rng = [self._rng[i] for i in keep]
        if not keep:
            self._keys, self._values, self._token, self._packed, self._seen = [], [], None, None, None
            self._capacity = 0
            return
        idx = mx.array(keep)
        self._keys = [k[idx] for k in self._keys]
        self._values = [v[idx] for v in self._values]
        self._token, self._packed, self._seen = self._token[idx], self._packed[idx], self._seen[idx]

    def _resize(self, capacity: int) -> None:
        if capacity > self._capacity and self._rows:
            self._keys = [_grow(k, capacity) for k in self._keys]
            self._values = [_grow(v, capacity) for v in self._values]
        self._capacity = max(self._capacity, capacity)

    # ---------------------------------------------------------------------------------- stepping

    def step(self) -> list[BatchStep]:
        """Read every active row's pending sample (one host sync) and queue the next step of the rows
        that go on. Returns one `BatchStep` per row that was active; rows whose step stopped
        (`stop_reason` "eos" or "cap") have left."""
        if not self._rows:
            return []
        goes_on = [r.index + 1 < r.n_steps for r in self._rows]
        if any(goes_on):
            nxt = self._advance()  # queued before the read: the device works while the host reads
        packed = self._packed.tolist()
        out, keep = [], []
        for i, (row, (tok, stop)) in enumerate(zip(self._rows, packed)):
            reason = "eos" if stop else ("cap" if not goes_on[i] else None)
            out.append(BatchStep(row.row_id, row.index, int(tok), reason))
            if reason is None:
                keep.append(i)
        if any(goes_on):
            self._keys, self._values, self._token, self._packed, self._seen, self._rng = nxt
            for row in self._rows:
                row.index += 1
                row.length += 1
        if len(keep) != len(self._rows):
            self._keep(keep)
        return out

    def _advance(self):
        """Queue one step for every active row on its pending token."""
        offsets = [r.length for r in self._rows]
        need = max(offsets) + 1
        if need > self._capacity:
            self._resize(-(-need // COMPILE_BLOCK) * COMPILE_BLOCK)
        audio_pos = mx.array([o - r.n_text for o, r in zip(offsets, self._rows)], dtype=mx.int32)
        eos_allowed = mx.array([r.index + 1 >= MIN_STEPS_BEFORE_EOS for r in self._rows])
        settings = tuple(r.sampling for r in self._rows)
        fn = self._step_fn(settings)
        out = fn(self._token, audio_pos, mx.array(offsets, dtype=mx.int32), self._seen, list(self._rng),
                 eos_allowed, self._keys, self._values)
        token, packed, seen, rng, keys, values = out
        mx.async_eval(packed)
        return keys, values, token, packed, seen, list(rng)

    def _step_fn(self, settings: tuple[RowSampling, ...]):
        """The pure batched step, per row-settings tuple (compiled when `self.compiled`). Compiled steps
        live on the model (`_batch_steps`, least recently used dropped), so every decoder of a model
        reuses their traces: a request's new decoder must not re-trace."""
        fns = self.model._batch_steps if self.compiled else self._fns
        model = self.model
        # CUDA: one persistent kernel (else five per layer) for all rows, K/V written in place
        # (decode_persistent.py, decode_kernels.py)
        fused = fused_decode_mode(model, len(settings))
        key = (settings, fused)
        if key in fns:
            if self.compiled:
                fns.move_to_end(key)
            return fns[key]
        cfg = model.config
        vocab = mx.arange(cfg.vocab_size)

        def step(token, audio_pos, offsets, seen, rng, eos_allowed, keys, values):
            seen = mx.logical_or(seen, vocab[None] == token[:, None])
            pos = model.ar_audio_position
            x = model.ar_audio_embedding(token[:, None]) * pos.x_scale
            x = x + pos.alpha * mx.take(pos._pe, audio_pos, axis=0)[:, None, :]  # (B, 1, D)
            if fused:
                logits = fused_decode_logits(model, x, offsets, keys, values, fused)
            else:
                caches = [ScatterKVCache(k, v, offsets, getattr(model, "fused_attention", False))
                          for k, v in zip(keys, values)]
                valid = (mx.arange(keys[0].shape[2])[None] <= offsets[:, None])[:, None, None, :]
                logits = model._head(model(x, valid, caches)[:, -1, :])
                keys, values = [c.keys for c in caches], [c.values for c in caches]
            token, stop, rng = sample_rows(logits, seen, rng, eos_allowed, settings, cfg.EOS)
            packed = mx.stack([token, stop.astype(mx.int32)], axis=1)
            return token, packed, seen, rng, keys, values

        fn = mx.compile(step, inputs=model) if self.compiled else step
        while len(fns) >= MAX_BATCH_STEPS:
            fns.pop(next(iter(fns)))
        fns[key] = fn
        return fn

    def warm_up_compiled(self, max_rows: int, max_positions: int, sampling: RowSampling) -> float:
        """Trace the compiled batched step for 1..`max_rows` rows with `sampling` at every K/V capacity
        block up to `max_positions`, so rows joining and leaving mid-request never stop to trace.
        Returns the seconds spent (0 when the decoder is eager)."""
        if not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        cfg = self.model.config
        for rows in range(1, max_rows + 1):  # rows leave one by one: every count is reached
            fn = self._step_fn((sampling,) * rows)
            for capacity in range(COMPILE_BLOCK, max(max_positions, COMPILE_BLOCK) + 1, COMPILE_BLOCK):
                kv = [mx.zeros((rows, cfg.head, capacity, cfg.head_dim), dtype=self.model.compute_dtype)
                      for _ in range(cfg.n_layer)]
                out = fn(mx.zeros((rows,), mx.int32), mx.zeros((rows,), mx.int32), mx.zeros((rows,), mx.int32),
                         mx.zeros((rows, cfg.vocab_size), mx.bool_), [mx.random.key(i) for i in range(rows)],
                         mx.zeros((rows,), mx.bool_), kv, list(kv))
                mx.eval(out)
        return time.perf_counter() - t0
