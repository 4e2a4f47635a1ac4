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
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoint import CheckpointError, read_torch_file, to_plain
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
]

# upstream infer_panel_naive: hard loop cap (1500 codes = 60 s per sentence) ...
MAX_DECODE_STEPS = 1500
# ... and the EOS column is dropped while idx < 11, so at least 11 codes precede a stop
MIN_STEPS_BEFORE_EOS = 11

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


class MultiheadAttention(nn.Module):
    """Packed-QKV self-attention (torch `nn.MultiheadAttention` names), scale 1/sqrt(head_dim)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.in_proj_weight = mx.zeros((3 * dim, dim))  # rows: Q | K | V, (out, in)
        self.in_proj_bias = mx.zeros((3 * dim,))
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        B, L, D = x.shape
        qkv = mx.addmm(self.in_proj_bias, x, self.in_proj_weight.T)  # (B, L, 3D)
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

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        x = self.norm1(x + self.self_attn(x, mask, cache))
        return self.norm2(x + self.linear2(nn.relu(self.linear1(x))))


class TransformerEncoder(nn.Module):
    """The `h` stack (no final norm: upstream builds none with norm_first=False)."""

    def __init__(self, config: T2SConfig):
        super().__init__()
        self.layers = [TransformerEncoderLayer(config) for _ in range(config.n_layer)]

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: list | None = None) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if cache is None else cache[i])
        return x


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
        x = self.ar_text_embedding(mx.array(phones)[None]) + self.bert_proj(mx.array(bert.T)[None])  # (1, Tx, D)
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

    # --------------------------------------------------------------------------------- public API

    def prefill_logits(self, phone_ids: np.ndarray, bert: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
        """Logits (S_text + S_prompt, 1025) at every position of the `[text; prompt]` sequence.

        `phone_ids` int (S_text,): prompt-text phones then target phones; `bert` float32 (1024, S_text);
        `prompt_tokens` int (S_prompt,) semantic codes of the reference audio.
        """
        xy = self.embed(phone_ids, bert, prompt_tokens)
        n_text = int(np.asarray(phone_ids).size)
        hidden = self(xy, self.prefill_mask(n_text, xy.shape[1] - n_text))
        logits = self.ar_predict_layer(hidden)[0]
        return np.array(logits.astype(mx.float32))

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
        cache_kind: str = "step",
    ) -> Iterator[DecodeStep]:
        """Upstream's decode loop (`infer_panel_naive`), one `DecodeStep` per sampled token.

        Per step: repetition penalty over the prompt codes and every earlier sample (once per unique
        id), EOS masked while `index < 11`, then top-p -> temperature -> top-k -> softmax -> draw;
        stop when the argmax of the penalised logits or the sample is EOS, or after
        `min(max_new_tokens, 1500)` steps. Step n+1 is queued (`mx.async_eval`) before step n's token is
        read, so Python overlaps compute and there is one host sync per token.
        """
        cfg = self.config
        n_steps = MAX_DECODE_STEPS if max_new_tokens is None else min(int(max_new_tokens), MAX_DECODE_STEPS)
        if n_steps <= 0:
            return
        xy = self.embed(phone_ids, bert, prompt_tokens)
        n_text = int(np.asarray(phone_ids).size)
        n_prompt = xy.shape[1] - n_text
        cache = make_cache(cfg.n_layer, kind=cache_kind)
        hidden = self(xy, self.prefill_mask(n_text, n_prompt), cache)
        logits = self.ar_predict_layer(hidden[:, -1, :])  # (1, V)

        vocab = mx.arange(cfg.vocab_size)
        prompt = np.asarray(prompt_tokens if prompt_tokens is not None else [], dtype=np.int32)
        seen = seen_mask(mx.array(prompt), cfg.vocab_size)  # (V,)
        sampler = make_sampler(top_k=top_k, top_p=top_p, temperature=temperature)
        key = mx.random.key(secrets.randbits(63) if seed is None else int(seed))
        audio_pos = self.ar_audio_position

        def sample(logits: mx.array, seen: mx.array, idx: int, key: mx.array):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if idx < MIN_STEPS_BEFORE_EOS:
                logits = mask_token(logits, cfg.EOS)
            key, sub = mx.random.split(key)
            token = sampler(logits, sub)  # (1,)
            stop = mx.logical_or(mx.argmax(logits, axis=-1) == cfg.EOS, token == cfg.EOS)
            # token and stop flag in one array: a single host read per step
            packed = mx.concatenate([token, stop.astype(mx.int32)])
            return token, packed, key

        token, packed, key = sample(logits, seen, 0, key)
        mx.async_eval(packed, logits)
        for idx in range(n_steps):
            if idx + 1 < n_steps:
                # queue step idx+1 on the (still lazy) token of step idx; wasted only on the last step
                seen_next = mx.logical_or(seen, vocab == token)
                x = self.ar_audio_embedding(token[None])  # (1, 1, D)
                # the token sampled at step idx sits at audio position n_prompt + idx
                x = x * audio_pos.x_scale + audio_pos.alpha * audio_pos.table(n_prompt + idx + 1)[n_prompt + idx]
                next_logits = self.ar_predict_layer(self(x, None, cache)[:, -1, :])
                next_token, next_packed, key = sample(next_logits, seen_next, idx + 1, key)
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
    """Checkpoint keys -> MLX parameter paths: strip the Lightning `model.` prefix. Pure, idempotent.

    Matrices are `(out, in)` in both frameworks and the packed QKV is kept packed, so nothing else
    changes.
    """
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in weights.items()}


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
    return dict(obj["weight"]), to_plain(obj["config"])


def load_t2s(path: str | Path, *, dtype: mx.Dtype = mx.float32) -> T2S:
    """Load the t2s GPT from a GPT-SoVITS `.ckpt` (no torch needed) or its `.safetensors` cache.

    Hyper-parameters come from the file's own config. Loading is strict: a missing, unexpected or
    mis-shaped tensor raises `CheckpointError` naming the file.
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
