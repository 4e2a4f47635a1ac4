"""The GPT-SoVITS v2 text-to-semantic GPT ("t2s", `AR/models/t2s_model.py`) in MLX.

Phones + BERT features + the voice's prompt codes -> 25 Hz semantic codes, autoregressively.
Architecture (gptsovits_architecture.md 2-3, Appendix A): 24 post-norm Transformer encoder layers
(LayerNorm eps 1e-5, ReLU MLP 512->2048->512, packed QKV with bias, 16 heads), interleaved sinusoidal
positions scaled by a learned alpha (one for text, one for audio; audio positions restart at 0),
phone embedding + `bert_proj`, audio embedding, a 512->1025 head without bias, EOS = 1024, and a
prefix-LM mask: text rows bidirectional over text, audio rows see all text and are causal over audio.

Attribute paths mirror the checkpoint's keys without the Lightning `model.` prefix, so `sanitize()`
only strips that prefix.

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
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..weights import (
    CheckpointError,
    check_float,
    check_int,
    check_state_dict,
    plain_config,
    read_torch_file,
    to_plain,
)
from .cache import make_cache
from .sample_utils import apply_repetition_penalty, make_sampler, mask_token, seen_mask

logger = logging.getLogger(__name__)

__all__ = [
    "T2SConfig",
    "T2S",
    "DecodeStep",
    "sanitize",
    "load_t2s",
    "save_t2s_safetensors",
    "convert_t2s",
    "MAX_DECODE_STEPS",
    "MIN_STEPS_BEFORE_EOS",
    "COMPILE_BLOCK",
    "PRECISIONS",
    "apply_precision",
]

# upstream infer_panel_naive: hard loop cap (1500 codes = 60 s per sentence) ...
MAX_DECODE_STEPS = 1500
# ... and the EOS column is dropped while idx < 11, so at least 11 codes precede a stop
MIN_STEPS_BEFORE_EOS = 11
# compiled step functions kept per model, one per sampling setting, least recently used dropped
MAX_COMPILED_STEPS = 4
# compiled decode: K/V capacity grows in buckets of this many positions (one re-trace per bucket)
COMPILE_BLOCK = 256

SAFETENSORS_FORMAT = "dora-primespeech-mlx/t2s-v1"

Convention = Literal["upstream", "dora2024"]


@dataclass(frozen=True)
class T2SConfig:
    """Hyper-parameters, read from the checkpoint's `config["model"]` (s1longer-v2.yaml)."""

    vocab_size: int = 1025
    phoneme_vocab_size: int = 732
    embedding_dim: int = 512
    hidden_dim: int = 512
    head: int = 16
    n_layer: int = 24
    EOS: int = 1024
    dropout: float = 0.0
    bert_dim: int = 1024
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # sane ranges first (a hostile config must not size anything): the real GPT is 1025/732/512/16/24/1024
        where = "t2s config"
        check_int(where, "vocab_size", self.vocab_size, 2, 65536)
        check_int(where, "phoneme_vocab_size", self.phoneme_vocab_size, 1, 65536)
        check_int(where, "embedding_dim", self.embedding_dim, 1, 8192)
        check_int(where, "hidden_dim", self.hidden_dim, 1, 8192)
        check_int(where, "head", self.head, 1, 1024)
        check_int(where, "n_layer", self.n_layer, 1, 256)
        check_int(where, "EOS", self.EOS, 0, 65535)
        check_float(where, "dropout", self.dropout, 0.0, 1.0)
        check_int(where, "bert_dim", self.bert_dim, 1, 8192)
        check_float(where, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, open_low=True)
        if self.EOS != self.vocab_size - 1:
            raise ValueError(f"t2s config: EOS ({self.EOS}) must be vocab_size - 1 ({self.vocab_size - 1})")
        if self.hidden_dim % self.head:
            raise ValueError(f"t2s config: hidden_dim {self.hidden_dim} is not divisible by head {self.head}")
        if self.embedding_dim != self.hidden_dim:
            # upstream adds embeddings straight into the hidden stream, so they must agree
            raise ValueError(
                f"t2s config: embedding_dim {self.embedding_dim} != hidden_dim {self.hidden_dim}; not a GPT-SoVITS GPT"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.head

    def check_weights(self, weights: dict[str, Any], source: str | Path) -> None:
        """Raise `CheckpointError` unless the (sanitized) tensors have the sizes this config implies.

        Runs before the model is built, so a config whose sizes the file does not back cannot make
        the loader allocate for them.
        """
        weights = check_state_dict(source, weights)
        d = self.hidden_dim
        want = {
            "ar_text_embedding.word_embeddings.weight": (self.phoneme_vocab_size, self.embedding_dim),
            "ar_audio_embedding.word_embeddings.weight": (self.vocab_size, self.embedding_dim),
            "bert_proj.weight": (self.embedding_dim, self.bert_dim),
            "ar_predict_layer.weight": (self.vocab_size, d),
            f"h.layers.{self.n_layer - 1}.linear1.weight": (self.ffn_dim, d),
        }
        for key, shape in want.items():
            got = weights.get(key)
            if got is None or tuple(got.shape) != shape:
                found = "missing" if got is None else f"of shape {tuple(got.shape)}"
                raise CheckpointError(f"{source}: the t2s config implies {key} of shape {shape}, the file's is "
                                      f"{found}; the config does not match the weights (or the file is damaged)")
        if any(k.startswith(f"h.layers.{self.n_layer}.") for k in weights):
            raise CheckpointError(f"{source}: the file holds more transformer layers than the config's "
                                  f"n_layer={self.n_layer}; the config does not match the weights")

    @property
    def ffn_dim(self) -> int:
        # upstream builds the MLP as 4 * model_dim; the config's `linear_units` is not read
        return 4 * self.hidden_dim

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> T2SConfig:
        """Build from a checkpoint `config` (uses its `model` section) or from that section itself.

        Unknown keys (e.g. `linear_units`, `n_layers` of other forks) are ignored.
        """
        config = to_plain(config)
        section = config.get("model", config) if isinstance(config, dict) else None
        if not isinstance(section, dict):
            raise ValueError("t2s config: expected a dict with a 'model' section (the GPT .ckpt's `config`)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: section[k] for k in names if k in section})


# --------------------------------------------------------------------------------------- modules


def sine_table(n_positions: int, dim: int) -> np.ndarray:
    """Interleaved sinusoidal table (n_positions, dim), float32, computed like upstream's `extend_pe`.

    `PE[p, 2i] = sin(p * w_i)`, `PE[p, 2i+1] = cos(p * w_i)`, `w_i = exp(2i * -(ln 10000 / dim))`, with
    every intermediate in float32 as torch does (the angle at large p is sensitive to that rounding).
    """
    position = np.arange(n_positions, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))
    angle = position * div_term  # float32
    pe = np.empty((n_positions, dim), dtype=np.float32)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


class TokenEmbedding(nn.Module):
    """`TokenEmbedding` (dropout 0): keeps the checkpoint path `<name>.word_embeddings.weight`."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.word_embeddings(ids)


class SinePositionalEmbedding(nn.Module):
    """`x * x_scale + alpha * PE[start : start + L]`, with `x_scale = 1` (scale=False) and learned alpha."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.x_scale = 1.0
        self.alpha = mx.ones((1,))
        self._pe = mx.array(sine_table(4000, dim))  # upstream's initial size; grown on demand

    def table(self, n_positions: int) -> mx.array:
        """The first `n_positions` rows of the table (n_positions, dim), extending it if needed."""
        if n_positions > self._pe.shape[0]:
            self._pe = mx.array(sine_table(max(n_positions, 2 * self._pe.shape[0]), self.dim))
        return self._pe[:n_positions]

    def __call__(self, x: mx.array, start: int = 0) -> mx.array:
        """x (B, L, dim) -> x * x_scale + alpha * PE[start : start + L]."""
        pe = self.table(start + x.shape[1])[start:]
        return x * self.x_scale + self.alpha * pe

    def at(self, x: mx.array, position: mx.array) -> mx.array:
        """x (B, 1, dim) -> x * x_scale + alpha * PE[position], `position` an int32 scalar array (traceable;
        call `table(n)` first so the table covers it)."""
        return x * self.x_scale + self.alpha * mx.take(self._pe, position, axis=0)


class MultiheadAttention(nn.Module):
    """Packed-QKV self-attention (torch `nn.MultiheadAttention` names), scale 1/sqrt(head_dim)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        # torch's in_proj_weight / in_proj_bias (rows Q | K | V), as a Linear so it can be quantised
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        B, L, D = x.shape
        qkv = self.in_proj(x)  # (B, L, 3D)
        q, k, v = mx.split(qkv, 3, axis=-1)
        # (B, L, D) -> (B, H, L, head_dim); head h uses channels h*hd .. h*hd+hd-1 of each of Q, K, V
        q, k, v = (t.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: `h = norm1(x + attn(x))`, `out = norm2(h + linear2(relu(linear1(h))))`."""

    def __init__(self, config: T2SConfig):
        super().__init__()
        d = config.hidden_dim
        self.self_attn = MultiheadAttention(d, config.head)
        self.linear1 = nn.Linear(d, config.ffn_dim)
        self.linear2 = nn.Linear(config.ffn_dim, d)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.compute_dtype = mx.float32

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        # matmuls (and the K/V cache) in `compute_dtype`; the residual stream and the norms stay in
        # float32 (the casts are no-ops at the fp32 default; see `apply_precision`)
        dt = self.compute_dtype
        x = self.norm1(x + self.self_attn(x.astype(dt), mask, cache))
        return self.norm2(x + self.linear2(nn.relu(self.linear1(x.astype(dt)))))


class TransformerEncoder(nn.Module):
    """The `h` stack (no final norm: upstream builds none with norm_first=False)."""

    def __init__(self, config: T2SConfig):
        super().__init__()
        self.layers = [TransformerEncoderLayer(config) for _ in range(config.n_layer)]

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: list | None = None) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if cache is None else cache[i])
        return x


class _SlotKVCache:
    """One layer's fixed-capacity K/V buffers (B, H, capacity, head_dim) inside the compiled step:
    the new position is written at a traced `offset`, and the whole buffer is returned (the caller
    masks positions after `offset`), so shapes stay static across steps."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

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


class T2S(nn.Module):
    """The text-to-semantic GPT (upstream `Text2SemanticDecoder`, inference path)."""

    def __init__(self, config: T2SConfig):
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.bert_proj = nn.Linear(config.bert_dim, d)
        self.ar_text_embedding = TokenEmbedding(config.phoneme_vocab_size, d)
        self.ar_text_position = SinePositionalEmbedding(d)
        self.ar_audio_embedding = TokenEmbedding(config.vocab_size, d)
        self.ar_audio_position = SinePositionalEmbedding(d)
        self.h = TransformerEncoder(config)
        self.ar_predict_layer = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        # default of decode_steps(compile=None); load_t2s sets it per device
        self.compile_decode = False
        # "fp32" (default) | "fp16" | "bf16" | "int8": set by `apply_precision`
        self.precision = "fp32"
        self.compute_dtype = mx.float32
        # compiled step functions per sampling setting; outside the module dict so never a parameter
        object.__setattr__(self, "_compiled_steps", OrderedDict())

    # ----------------------------------------------------------------------------- graph pieces

    def _check_inputs(
        self, phone_ids: np.ndarray, bert: np.ndarray, prompt_tokens: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        phones = np.asarray(phone_ids)
        if phones.ndim != 1 or phones.size == 0 or not np.issubdtype(phones.dtype, np.integer):
            raise ValueError(
                f"phone_ids must be a non-empty 1-D integer array (S_text,), got {phones.dtype} {phones.shape}"
            )
        if phones.min() < 0 or phones.max() >= cfg.phoneme_vocab_size:
            raise ValueError(
                f"phone_ids must lie in [0, {cfg.phoneme_vocab_size}), got [{phones.min()}, {phones.max()}]"
            )
        bert = np.asarray(bert, dtype=np.float32)
        if bert.shape != (cfg.bert_dim, phones.size):
            raise ValueError(f"bert must have shape ({cfg.bert_dim}, S_text={phones.size}), got {bert.shape}")
        prompt = np.zeros((0,), np.int64) if prompt_tokens is None else np.asarray(prompt_tokens)
        if prompt.ndim != 1 or (prompt.size and not np.issubdtype(prompt.dtype, np.integer)):
            raise ValueError(
                f"prompt_tokens must be a 1-D integer array (S_prompt,), got {prompt.dtype} {prompt.shape}"
            )
        if prompt.size and (prompt.min() < 0 or prompt.max() >= cfg.EOS):
            raise ValueError(
                f"prompt_tokens must be semantic codes in [0, {cfg.EOS}), got [{prompt.min()}, {prompt.max()}]"
            )
        return phones.astype(np.int32), bert, prompt.astype(np.int32)

    def embed(self, phone_ids: np.ndarray, bert: np.ndarray, prompt_tokens: np.ndarray | None) -> mx.array:
        """`xy_pos` (1, S_text + S_prompt, 512): text and prompt-audio embeddings with their positions."""
        phones, bert, prompt = self._check_inputs(phone_ids, bert, prompt_tokens)
        bert_x = mx.array(bert.T)[None].astype(self.compute_dtype)
        x = self.ar_text_embedding(mx.array(phones)[None]) + self.bert_proj(bert_x)  # (1, Tx, D)
        x = self.ar_text_position(x)
        if prompt.size == 0:
            return x
        y = self.ar_audio_position(self.ar_audio_embedding(mx.array(prompt)[None]))  # positions restart at 0
        return mx.concatenate([x, y], axis=1)

    @staticmethod
    def prefill_mask(n_text: int, n_prompt: int) -> mx.array:
        """Boolean (S, S) mask, True = may attend: text rows see text only; audio rows see all text and
        the audio up to themselves."""
        s = n_text + n_prompt
        rows = mx.arange(s)[:, None]
        cols = mx.arange(s)[None, :]
        return mx.where(rows < n_text, cols < n_text, mx.logical_or(cols < n_text, cols <= rows))

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: list | None = None) -> mx.array:
        """Hidden states (B, L, 512) of the layer stack for embedded inputs `x` (B, L, 512)."""
        return self.h(x, mask, cache)

    def _head(self, hidden: mx.array) -> mx.array:
        """float32 logits from hidden states (sampling is always float32)."""
        return self.ar_predict_layer(hidden.astype(self.compute_dtype)).astype(mx.float32)

    # --------------------------------------------------------------------------------- public API

    def prefill_logits(self, phone_ids: np.ndarray, bert: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
        """Logits (S_text + S_prompt, 1025) at every position of the `[text; prompt]` sequence.

        `phone_ids` int (S_text,): prompt-text phones then target phones; `bert` float32 (1024, S_text);
        `prompt_tokens` int (S_prompt,) semantic codes of the reference audio.
        """
        xy = self.embed(phone_ids, bert, prompt_tokens)
        n_text = int(np.asarray(phone_ids).size)
        hidden = self(xy, self.prefill_mask(n_text, xy.shape[1] - n_text))
        logits = self._head(hidden)[0]
        return np.array(logits)

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
        """`sample(logits (1, V), seen (V,), key, eos_allowed) -> (token (1,), packed (2,), key)`.

        `eos_allowed` is a Python bool (eager) or a bool array (traced). `packed` holds the token and
        the stop flag, so the loop reads both with a single host sync.
        """
        eos = self.config.EOS
        sampler = make_sampler(top_k=top_k, top_p=top_p, temperature=temperature)

        def sample(logits: mx.array, seen: mx.array, key: mx.array, eos_allowed):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if isinstance(eos_allowed, mx.array):
                logits = mx.where(eos_allowed, logits, mask_token(logits, eos))
            elif not eos_allowed:
                logits = mask_token(logits, eos)
            key, sub = mx.random.split(key)
            token = sampler(logits, sub)  # (1,)
            stop = mx.logical_or(mx.argmax(logits, axis=-1) == eos, token == eos)
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

        def step(token, audio_pos, offset, seen, key, eos_allowed, keys, values):
            seen = mx.logical_or(seen, vocab == token)
            x = self.ar_audio_position.at(self.ar_audio_embedding(token[None]), audio_pos)  # (1, 1, D)
            caches = [_SlotKVCache(k, v, offset) for k, v in zip(keys, values)]
            valid = (mx.arange(keys[0].shape[2]) <= offset)[None]  # (1, capacity): written slots only
            logits = self._head(self(x, valid, caches)[:, -1, :])
            token, packed, key = sample(logits, seen, key, eos_allowed)
            return logits, token, packed, seen, key, [c.keys for c in caches], [c.values for c in caches]

        if not compiled:
            return step
        cache_key = sample.settings
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


# ------------------------------------------------------------------------------------- loading


def sanitize(weights: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint keys -> MLX parameter paths: strip the Lightning `model.` prefix and name torch's
    packed `self_attn.in_proj_weight/bias` as the `self_attn.in_proj` Linear. Pure, idempotent.

    Matrices are `(out, in)` in both frameworks and the packed QKV is kept packed, so nothing else
    changes.
    """
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("model.")
        key = key.replace(".in_proj_weight", ".in_proj.weight").replace(".in_proj_bias", ".in_proj.bias")
        out[key] = value
    return out


PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# 8-bit: per-group affine quantisation of every Linear (mlx.nn.quantize), 64 weights per group
INT8_GROUP_SIZE = 64


def apply_precision(model: T2S, precision: str) -> T2S:
    """Run `model` in a lower precision, in place: "fp16"/"bf16" store the Linear and embedding
    weights in that type and run the matmuls and K/V cache in it, while LayerNorm parameters, the
    residual stream, positions and logits (so sampling) stay float32; "int8" quantises every Linear
    to 8 bits (group size 64) over fp16 activations. "fp32" (the default) changes nothing.

    Opt-in: parity bounds per mode are measured by benchmarks/bench_precision.py and held by
    tests/test_precision.py.
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
        if isinstance(module, (TransformerEncoderLayer, T2S)):
            module.compute_dtype = dtype
    model.precision = precision
    mx.eval(model.parameters())
    model._compiled_steps.clear()
    return model


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
    cfg.check_weights(sanitize(weights), path)
    model = T2S(cfg)
    params = [(k, mx.array(v).astype(dtype)) for k, v in sanitize(weights).items()]
    try:
        model.load_weights(params, strict=True)
    except ValueError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"{path}: weights do not match a t2s GPT with {asdict(cfg)}: {detail}; "
            "the file is not a GPT-SoVITS GPT checkpoint, or it is damaged"
        ) from None
    mx.eval(model.parameters())
    model.eval()
    # measured (benchmarks/bench_t2s.py): compiled decode is ~22% faster per token on an H100 and
    # exact, but slower on mlx-cpu, where the static cache's padded attention outweighs the saved
    # graph building; the first compiled call pays a one-off JIT (~4 s on CUDA)
    model.compile_decode = mx.default_device().type == mx.gpu if compile is None else bool(compile)
    apply_precision(model, precision)
    logger.info("loaded t2s GPT from %s (%d tensors, %d layers)", path, len(params), cfg.n_layer)
    return model


def save_t2s_safetensors(model: T2S, path: str | Path, *, dtype: mx.Dtype = mx.float16) -> Path:
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
