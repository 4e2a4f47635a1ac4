"""The GPT-SoVITS v2 text-to-semantic GPT ("t2s", `AR/models/t2s_model.py`) in MLX: the graph.

Phones + BERT features + the voice's prompt codes -> 25 Hz semantic codes, autoregressively.
Architecture (gptsovits_architecture.md 2-3, Appendix A): 24 post-norm Transformer encoder layers
(LayerNorm eps 1e-5, ReLU MLP 512->2048->512, packed QKV with bias, 16 heads), interleaved sinusoidal
positions scaled by a learned alpha (one for text, one for audio; audio positions restart at 0),
phone embedding + `bert_proj`, audio embedding, a 512->1025 head without bias, EOS = 1024, and a
prefix-LM mask: text rows bidirectional over text, audio rows see all text and are causal over audio.

Attribute paths mirror the checkpoint's keys without the Lightning `model.` prefix, so `sanitize()`
only strips that prefix.

Like an mlx-lm model file, this holds the config, the graph (`T2SGraph`; its `prefill_logits` is
the teacher-forced forward over the whole prefix, no cache, no sampling) and `sanitize`, nothing
else. What builds on it imports it, never the reverse:

- `t2s_generate`: `T2S`, the graph plus the decode loop (`decode_steps`, `generate`, compiled steps);
- `t2s_precision`: `apply_precision` (fp16, bf16, int8);
- `t2s_io`: `load_t2s`, `save_t2s_safetensors`, `convert_t2s`. Loading is not here because it builds
  a `T2S` and applies a precision, which both sit above this file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..weights import CheckpointError, check_float, check_int, check_state_dict
from .attention_kernels import single_query_attention
from .base import ModelConfig

__all__ = ["T2SConfig", "T2SGraph", "sanitize", "sine_table"]


@dataclass(frozen=True)
class T2SConfig(ModelConfig):
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
    def select(cls, config: dict[str, Any]) -> Any:
        """The checkpoint config's `model` section, or the config itself when it is that section.

        Unknown keys (e.g. `linear_units`, `n_layers` of other forks) are ignored by `from_dict`.
        """
        return config.get("model", config)


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
        lengths = None
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            # a decode cache that offers per-row valid lengths: the fused single-query kernel
            lengths = getattr(cache, "fused_lengths", None) if L == 1 else None
        if lengths is not None:
            out = single_query_attention(q, k, v, lengths, self.scale)
        else:
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


# ----------------------------------------------------------------------------------------- graph


class T2SGraph(nn.Module):
    """The text-to-semantic GPT's graph (upstream `Text2SemanticDecoder`, inference path): embeddings
    with positions, the prefix-LM mask, the layer stack and the head. `t2s_generate.T2S` decodes
    with it."""

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
        # "fp32" (default) | "fp16" | "bf16" | "int8": set by `apply_precision`
        self.precision = "fp32"
        self.compute_dtype = mx.float32
        # functions traced over this graph (t2s_generate's compiled decode steps, per sampling
        # setting): whatever changes the graph in place empties it; outside the module dict, so
        # never a parameter
        object.__setattr__(self, "_compiled_steps", OrderedDict())
        object.__setattr__(self, "_batch_steps", OrderedDict())  # t2s_batch's, per row-settings tuple

    def _check_inputs(
        self, phone_ids: np.ndarray, bert: np.ndarray | mx.array, prompt_tokens: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | mx.array, np.ndarray]:
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
        # an MLX array (the engine's BERT features, still on the device) is checked without a host copy
        bert = bert.astype(mx.float32) if isinstance(bert, mx.array) else np.asarray(bert, dtype=np.float32)
        if tuple(bert.shape) != (cfg.bert_dim, phones.size):
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

    def embed(self, phone_ids: np.ndarray, bert: np.ndarray | mx.array, prompt_tokens: np.ndarray | None) -> mx.array:
        """`xy_pos` (1, S_text + S_prompt, 512): text and prompt-audio embeddings with their positions."""
        phones, bert, prompt = self._check_inputs(phone_ids, bert, prompt_tokens)
        bert_x = (bert if isinstance(bert, mx.array) else mx.array(bert)).T[None].astype(self.compute_dtype)
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


# ------------------------------------------------------------------------------- checkpoint keys


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
