"""Decoding with the t2s GPT: `T2S`, the graph of `t2s.py` with upstream's sampling loop.

Token convention of `generate` (gptsovits_architecture.md 2.8, oracle.md 3.5):

- `"upstream"` (default, current GPT-SoVITS): every generated token; at the step where the stop test
  fires (argmax of the penalised logits is EOS, or the sample is EOS) that step's sample is dropped,
  so EOS is never returned. When the step cap (`max_new_tokens`, at most 1500) ends decoding, the
  last token is kept: `max_new_tokens=N` returns exactly N tokens unless EOS comes first.
- `"dora2024"` (the 2024-09 code that dora-primespeech bundles): its `infer_panel` returns
  `y[:, :-1]` and `idx - 1` and `TTS.run` keeps `pred[-idx:]`, i.e. generated tokens `1 .. K-1` for
  a stop at step K: the first generated token is lost, and the last sampled token is dropped on
  every stop, the step cap included (so `max_new_tokens=N` gives N - 2 tokens).

Compiled decode (`decode_steps(..., compile=True)`, `load_t2s(..., compile=True)`): one decode step
(embedding, 24 layers, head, penalty, sampling) goes through `mx.compile`. Compiled graphs need
repeating shapes, so that path keeps K/V in fixed-capacity buffers grown in `COMPILE_BLOCK`-position
buckets, writes each step at a traced offset and masks the unwritten tail: the step's shapes change
once per bucket, not per token. Its logits agree with the eager path to float32 rounding (tests).
`load_t2s` turns it on by default on a GPU, where it measured faster, and leaves the CPU eager.

`T2S` subclasses `T2SGraph`, so this file imports the model file and the model file knows nothing
of decoding (no import cycle, as in mlx-lm, where generation sits above the models); `t2s_io.load_t2s`
builds a `T2S`. Sampling is `sample_utils`'s, the growing K/V cache `cache`'s; the compiled path's
fixed-capacity buffers are here because only this loop writes them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np

from ..constants import MAX_DECODE_STEPS
from .cache import COMPILE_BLOCK, make_cache
from .decode_kernels import fused_decode_logits, fused_decode_mode
from .sample_utils import MIN_STEPS_BEFORE_EOS, RowSampling, sample_rows, seen_mask
from .t2s import T2SConfig, T2SGraph
from .t2s_batch import BatchDecoder

__all__ = ["T2S", "DecodeStep", "MIN_STEPS_BEFORE_EOS", "COMPILE_BLOCK"]

# compiled step functions kept per model, one per sampling setting, least recently used dropped
MAX_COMPILED_STEPS = 4

Convention = Literal["upstream", "dora2024"]


class _SlotKVCache:
    """One layer's fixed-capacity K/V buffers (B, H, capacity, head_dim) inside the compiled step:
    the new position is written at a traced `offset`, and the whole buffer is returned (the caller
    masks positions after `offset`), so shapes stay static across steps."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, fused: bool = False):
        self.keys, self.values, self.offset = keys, values, offset
        # valid positions for the fused attention kernel (models/attention_kernels.py), when in use
        self.fused_lengths = (offset + 1)[None] if fused else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset[None], axes=(2,))
        return self.keys, self.values


def _fit_capacity(buf: mx.array, length: int, capacity: int) -> mx.array:
    """The first `length` positions of `buf` (B, H, T, D) in a zero-padded buffer of `capacity`."""
    buf = buf[:, :, :length, :]
    B, H, _, D = buf.shape
    return mx.concatenate([buf, mx.zeros((B, H, capacity - length, D), dtype=buf.dtype)], axis=2)


@dataclass(frozen=True)
class DecodeStep:
    """One autoregressive step.

    `token` is the sample drawn at step `index`; `stop_reason` is None while decoding goes on,
    `"eos"` when this step's stop test fired (the token is then not part of the output) or `"cap"`
    when the step limit ends decoding (the token is kept under the upstream convention). `logits`
    are the head's raw logits (V,) before any penalty, only when asked for.
    """

    index: int
    token: int
    stop_reason: str | None
    logits: np.ndarray | None = None


class T2S(T2SGraph):
    """The text-to-semantic GPT that decodes (upstream `Text2SemanticDecoder.infer_panel_naive`):
    what `load_t2s` returns."""

    def __init__(self, config: T2SConfig):
        super().__init__(config)
        # default of decode_steps(compile=None); load_t2s sets it per device
        self.compile_decode = False
        # the static/compiled and batched steps use the fused head_dim-32 attention kernel; load_t2s
        # sets it where the kernel passed its self-check on this device
        self.fused_attention = False

    # --------------------------------------------------------------------------------- public API

    def decode_steps(
        self,
        phone_ids: np.ndarray,
        bert: np.ndarray,
        prompt_tokens: np.ndarray,
        *,
        top_k: int | None = 5,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.35,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        with_logits: bool = False,
        cache_kind: str | None = None,
        compile: bool | None = None,
    ) -> Iterator[DecodeStep]:
        """Upstream's decode loop (`infer_panel_naive`), one `DecodeStep` per sampled token.

        Per step: repetition penalty over the prompt codes and every earlier sample (once per unique
        id), EOS masked while `index < 11`, then top-p -> temperature -> top-k -> softmax -> draw;
        stop when the argmax of the penalised logits or the sample is EOS, or after
        `min(max_new_tokens, 1500)` steps. Step n+1 is queued (`mx.async_eval`) before step n's token is
        read, so Python overlaps compute and there is one host sync per token.

        `compile` (None: the model's `compile_decode`, set by `load_t2s`) runs each step after the
        first through one `mx.compile`d function over a static-shape cache. `cache_kind` is "step"
        (block-allocated, the eager default), "concat" (baseline) or "static" (the compiled path's
        fixed-capacity buffers; run eagerly when `compile` is False).
        """
        cfg = self.config
        compiled = self.compile_decode if compile is None else bool(compile)
        kind = cache_kind or ("static" if compiled else "step")
        if kind not in ("step", "concat", "static"):
            raise ValueError(f"unknown cache_kind {kind!r}; use 'step', 'concat' or 'static'")
        if compiled and kind != "static":
            raise ValueError(f"compile=True needs the static cache (cache_kind='static' or None), got {kind!r}")
        n_steps = MAX_DECODE_STEPS if max_new_tokens is None else min(int(max_new_tokens), MAX_DECODE_STEPS)
        if n_steps <= 0:
            return
        xy = self.embed(phone_ids, bert, prompt_tokens)
        n_text = int(np.asarray(phone_ids).size)
        n_prompt = xy.shape[1] - n_text
        cache = make_cache(cfg.n_layer, kind="concat" if kind == "concat" else "step")
        hidden = self(xy, self.prefill_mask(n_text, n_prompt), cache)
        logits = self._head(hidden[:, -1, :])  # (1, V)

        prompt = np.asarray(prompt_tokens if prompt_tokens is not None else [], dtype=np.int32)
        seen = seen_mask(mx.array(prompt), cfg.vocab_size)  # (V,)
        key = mx.random.key(secrets.randbits(63) if seed is None else int(seed))
        sample = self._sample_fn(top_k, top_p, temperature, repetition_penalty)
        # the token sampled at step idx is embedded at audio position n_prompt + idx (cache slot S + idx)
        self.ar_audio_position.table(n_prompt + n_steps)
        if kind == "static":
            advance = self._static_advance(cache, xy.shape[1], n_text, compiled, sample)
        else:
            advance = self._eager_advance(cache, n_prompt, sample)

        token, packed, key = sample(logits, seen, key, False)
        mx.async_eval(packed, logits)
        for idx in range(n_steps):
            if idx + 1 < n_steps:
                # queue step idx+1 on the (still lazy) token of step idx; wasted only on the last step
                next_logits, next_token, next_packed, seen_next, key = advance(token, seen, key, idx)
                mx.async_eval(next_packed, next_logits)
            tok, stop = packed.tolist()
            if stop:
                reason = "eos"
            elif idx == n_steps - 1:
                reason = "cap"
            else:
                reason = None
            yield DecodeStep(idx, int(tok), reason, np.array(logits[0]) if with_logits else None)
            if reason is not None:
                return
            token, packed, logits, seen = next_token, next_packed, next_logits, seen_next

    # ------------------------------------------------------------------------------ decode internals

    def _sample_fn(self, top_k: int | None, top_p: float, temperature: float, repetition_penalty: float):
        """`sample(logits (1, V), seen (V,), key, eos_allowed) -> (token (1,), packed (2,), key)`:
        `sample_rows` for one row (the batched decoder's sampling).

        `eos_allowed` is a Python bool (eager) or a bool array (traced). `packed` holds the token and
        the stop flag, so the loop reads both with a single host sync.
        """
        eos = self.config.EOS
        row = RowSampling(top_k, top_p, temperature, repetition_penalty)

        def sample(logits: mx.array, seen: mx.array, key: mx.array, eos_allowed):
            allowed = (eos_allowed if isinstance(eos_allowed, mx.array) else mx.array(bool(eos_allowed))).reshape(1)
            token, stop, (key,) = sample_rows(logits, seen[None], [key], allowed, [row], eos)
            return token, mx.concatenate([token, stop.astype(mx.int32)]), key

        sample.settings = (top_k, top_p, temperature, repetition_penalty)
        return sample

    def _eager_advance(self, cache: list, n_prompt: int, sample):
        """Step function over a growing cache ("step"/"concat"): graph rebuilt every token."""
        vocab = mx.arange(self.config.vocab_size)
        audio_pos = self.ar_audio_position

        def advance(token: mx.array, seen: mx.array, key: mx.array, idx: int):
            seen = mx.logical_or(seen, vocab == token)
            x = self.ar_audio_embedding(token[None])  # (1, 1, D)
            x = x * audio_pos.x_scale + audio_pos.alpha * audio_pos.table(n_prompt + idx + 1)[n_prompt + idx]
            logits = self._head(self(x, None, cache)[:, -1, :])
            token, packed, key = sample(logits, seen, key, idx + 1 >= MIN_STEPS_BEFORE_EOS)
            return logits, token, packed, seen, key

        return advance

    def _static_advance(self, cache: list, length: int, n_text: int, compiled: bool, sample):
        """Step function over fixed-capacity K/V buffers, through `mx.compile` when `compiled`.

        Capacity grows by `COMPILE_BLOCK` positions when full, so a compiled step re-traces once per
        bucket. The step's pure function is cached on the model per sampling setting.
        """
        block = COMPILE_BLOCK
        capacity = -(-(length + 1) // block) * block
        keys = [_fit_capacity(c.keys, length, capacity) for c in cache]
        values = [_fit_capacity(c.values, length, capacity) for c in cache]
        fn = self._static_step(sample, compiled)

        def advance(token: mx.array, seen: mx.array, key: mx.array, idx: int):
            nonlocal keys, values, capacity
            offset = length + idx  # cache slot of the token sampled at step idx
            if offset >= capacity:
                keys = [_fit_capacity(k, offset, capacity + block) for k in keys]
                values = [_fit_capacity(v, offset, capacity + block) for v in values]
                capacity += block
            logits, token, packed, seen, key, keys, values = fn(
                token, mx.array(offset - n_text, dtype=mx.int32), mx.array(offset, dtype=mx.int32), seen, key,
                mx.array(idx + 1 >= MIN_STEPS_BEFORE_EOS), keys, values,
            )
            return logits, token, packed, seen, key

        return advance

    def warm_up_compiled(self, max_positions: int = 1024, *, top_k: int | None = 5, top_p: float = 1.0,
                         temperature: float = 1.0, repetition_penalty: float = 1.35) -> float:
        """Trace the compiled decode step for every K/V capacity up to `max_positions` (one trace per
        `COMPILE_BLOCK`), for one sampling setting, so a long utterance does not stop mid-sentence to
        re-trace when its cache outgrows a block. Returns the seconds spent."""
        t0 = time.perf_counter()
        cfg = self.config
        fn = self._static_step(self._sample_fn(top_k, top_p, temperature, repetition_penalty), True)
        seen = mx.zeros((cfg.vocab_size,), dtype=mx.bool_)
        key = mx.random.key(0)
        for capacity in range(COMPILE_BLOCK, max(max_positions, COMPILE_BLOCK) + 1, COMPILE_BLOCK):
            shape = (1, cfg.head, capacity, cfg.head_dim)
            kv = [mx.zeros(shape, dtype=self.compute_dtype) for _ in range(cfg.n_layer)]
            out = fn(mx.array([0]), mx.array(0, dtype=mx.int32), mx.array(0, dtype=mx.int32), seen, key,
                     mx.array(False), kv, list(kv))
            mx.eval(out)
        return time.perf_counter() - t0

    def _static_step(self, sample, compiled: bool):
        """The pure decode step `(token, audio_pos, offset, seen, key, eos_allowed, keys, values) ->
        (logits, token, packed, seen, key, keys, values)`, compiled once per sampling setting."""
        vocab = mx.arange(self.config.vocab_size)
        # CUDA: one persistent kernel for the step, else five per layer, K/V written in place
        # (decode_persistent.py, decode_kernels.py)
        fused = fused_decode_mode(self)

        def step(token, audio_pos, offset, seen, key, eos_allowed, keys, values):
            seen = mx.logical_or(seen, vocab == token)
            x = self.ar_audio_position.at(self.ar_audio_embedding(token[None]), audio_pos)  # (1, 1, D)
            if fused:
                logits = fused_decode_logits(self, x, offset, keys, values, fused)
            else:
                caches = [_SlotKVCache(k, v, offset, self.fused_attention) for k, v in zip(keys, values)]
                valid = (mx.arange(keys[0].shape[2]) <= offset)[None]  # (1, capacity): written slots only
                logits = self._head(self(x, valid, caches)[:, -1, :])
                keys, values = [c.keys for c in caches], [c.values for c in caches]
            token, packed, key = sample(logits, seen, key, eos_allowed)
            return logits, token, packed, seen, key, keys, values

        if not compiled:
            return step
        cache_key = (sample.settings, fused)
        fns = self._compiled_steps
        if cache_key in fns:
            fns.move_to_end(cache_key)
        else:
            # inputs=self: the weights are read at every call, so reloaded weights are not stale
            fns[cache_key] = mx.compile(step, inputs=self)
            while len(fns) > MAX_COMPILED_STEPS:  # each holds traced graphs per cache block
                fns.popitem(last=False)
        return fns[cache_key]

    def generate_stream(
        self,
        phone_ids: np.ndarray,
        bert: np.ndarray,
        prompt_tokens: np.ndarray,
        *,
        top_k: int | None = 5,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.35,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        convention: Convention = "upstream",
    ) -> Iterator[int]:
        """Yield the new semantic codes one by one as they are decided (see `generate`)."""
        if convention not in ("upstream", "dora2024"):
            raise ValueError(f"convention must be 'upstream' or 'dora2024', got {convention!r}")
        for step in self.decode_steps(
            phone_ids, bert, prompt_tokens, top_k=top_k, top_p=top_p, temperature=temperature,
            repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        ):
            if step.stop_reason == "eos":
                return
            if convention == "dora2024" and (step.index == 0 or step.stop_reason == "cap"):
                continue  # 2024 code: first generated token lost, last sample dropped on any stop
            yield step.token

    def generate(
        self,
        phone_ids: np.ndarray,
        bert: np.ndarray,
        prompt_tokens: np.ndarray,
        *,
        top_k: int | None = 5,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.35,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        convention: Convention = "upstream",
    ) -> np.ndarray:
        """New semantic codes (N,) int64 for `[text; prompt]`, sampled like upstream GPT-SoVITS.

        Defaults are dora-primespeech's (top_k 5, top_p 1, temperature 1, repetition penalty 1.35).
        `top_k=None` disables top-k; `top_k=1` is greedy. `max_new_tokens=None` means upstream's
        1500-step cap. `seed` makes the draw reproducible (MLX's generator, not torch's).
        `convention` selects the token hand-off (module docstring): "upstream" or "dora2024".
        """
        tokens = list(
            self.generate_stream(
                phone_ids, bert, prompt_tokens, top_k=top_k, top_p=top_p, temperature=temperature,
                repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
                convention=convention,
            )
        )
        return np.asarray(tokens, dtype=np.int64)

    def generate_batch(
        self,
        rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        *,
        top_k: int | None = 5,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.35,
        max_new_tokens: int | None = None,
        seed: int | Sequence[int | None] | None = None,
        convention: Convention = "upstream",
        max_rows: int | None = None,
    ) -> list[np.ndarray]:
        """`generate` for several `(phone_ids, bert, prompt_tokens)` rows in one decode loop.

        Row i's codes are what `generate` returns for it alone with `seed[i]` (an int seed is used
        for every row), up to float rounding of the batched matmuls (t2s_batch). At most `max_rows`
        rows decode together (None: all); the next row joins as soon as one stops.
        """
        if convention not in ("upstream", "dora2024"):
            raise ValueError(f"convention must be 'upstream' or 'dora2024', got {convention!r}")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(rows)
        if len(seeds) != len(rows):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(rows)} rows")
        decoder = BatchDecoder(self)
        tokens: dict[int, list[int]] = {}
        owner: dict[int, int] = {}
        waiting = list(range(len(rows)))
        limit = len(rows) if max_rows is None else max(1, int(max_rows))
        while waiting or decoder.active:
            while waiting and decoder.active < limit:
                i = waiting.pop(0)
                phone_ids, bert, prompt = rows[i]
                owner[decoder.add(phone_ids, bert, prompt, top_k=top_k, top_p=top_p, temperature=temperature,
                                  repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                                  seed=seeds[i])] = i
                tokens[i] = []
            for step in decoder.step():
                if step.stop_reason == "eos":
                    continue
                if convention == "dora2024" and (step.index == 0 or step.stop_reason == "cap"):
                    continue
                tokens[owner[step.row]].append(step.token)
        return [np.asarray(tokens[i], dtype=np.int64) for i in range(len(rows))]
