"""chinese-roberta-wwm-ext-large in MLX: Chinese text -> 1024-d phone-level features.

Despite its name the checkpoint is a plain post-norm BERT (`BertForMaskedLM`); GPT-SoVITS uses
`hidden_states[-3]` (the output of layer 22 of 24) with the `[CLS]`/`[SEP]` rows dropped, each
character's row repeated `word2ph[i]` times. Layers past the one needed, the pooler and the MLM head
never run. Attribute paths mirror the HF keys (`bert.encoder.layer.{i}.attention.self.query`, ...).
Tokenisation uses the `tokenizers` library (tokenizer.json, or vocab.txt), never transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..weights import check_float, check_int
from ..weights.cache import load_hf_weights_cached
from .base import ModelConfig, load_strict, read_hf_config

logger = logging.getLogger(__name__)

__all__ = ["BertConfig", "BertEncoderModel", "load_bert", "load_tokenizer"]


@dataclass
class BertConfig(ModelConfig):
    """The fields of an HF `BertConfig` (config.json) that inference needs; defaults are RoBERTa-wwm-ext-large."""

    vocab_size: int = 21128
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        # sane ranges (chinese-roberta-wwm-ext-large: 21128 x 1024, 24 layers): nothing is sized by a hostile config
        w = "BERT config.json"
        check_int(w, "vocab_size", self.vocab_size, 1, 262144)
        check_int(w, "hidden_size", self.hidden_size, 1, 8192)
        check_int(w, "num_hidden_layers", self.num_hidden_layers, 1, 128)
        check_int(w, "num_attention_heads", self.num_attention_heads, 1, 256)
        check_int(w, "intermediate_size", self.intermediate_size, 1, 65536)
        check_int(w, "max_position_embeddings", self.max_position_embeddings, 1, 65536)
        check_int(w, "type_vocab_size", self.type_vocab_size, 1, 1024)
        check_float(w, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, open_low=True)
        if self.hidden_act != "gelu":
            raise ValueError(f"BERT config.json: hidden_act={self.hidden_act!r} is not supported (expected 'gelu', erf form)")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"BERT config.json: position_embedding_type={self.position_embedding_type!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("BERT config.json: hidden_size must be a multiple of num_attention_heads")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, input_ids: mx.array) -> mx.array:
        t = input_ids.shape[1]
        # token_type_ids are all 0 for a single sentence, positions start at 0
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings.weight[:t]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.scale = (d // cfg.num_attention_heads) ** -0.5
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, d = x.shape

        def heads(y: mx.array) -> mx.array:  # (B, T, D) -> (B, H, T, Dh)
            return y.reshape(b, t, self.n_heads, -1).transpose(0, 2, 1, 3)

        o = mx.fast.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                                 scale=self.scale)
        return o.transpose(0, 2, 1, 3).reshape(b, t, d)


class BertResidualOutput(nn.Module):
    """`dense` then LayerNorm of (projection + residual): HF `BertSelfOutput` / `BertOutput`."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def __call__(self, x: mx.array) -> mx.array:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.dense(x))  # erf GELU, as HF "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = [BertLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class BertEncoderModel(nn.Module):
    """The `bert.*` part of `BertForMaskedLM` (no pooler, no MLM head), plus its tokenizer."""

    def __init__(self, cfg: BertConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self._tokenizer = tokenizer

    @property
    def phone_feature_layer(self) -> int:
        """Index into `hidden_states` of the features GPT-SoVITS uses: `hidden_states[-3]`."""
        return self.config.num_hidden_layers - 2

    def forward_hidden(self, input_ids: mx.array, n_layers: int | None = None) -> list[mx.array]:
        """Embedding output then the outputs of the first `n_layers` layers, each (B, T, hidden)."""
        n = self.config.num_hidden_layers if n_layers is None else n_layers
        x = self.bert.embeddings(input_ids)
        out = [x]
        for layer in self.bert.encoder.layer[:n]:
            x = layer(x)
            out.append(x)
        return out

    def hidden_states(self, input_ids: Sequence[int] | np.ndarray, n_layers: int | None = None) -> list[np.ndarray]:
        """HF `output_hidden_states` for one sequence: `[embeddings, layer 1, ..., layer n]`, each (T, hidden).

        `input_ids` is `(T,)` or `(1, T)` token ids including `[CLS]`/`[SEP]`; `n_layers` (default:
        all) limits how many layers run.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"input_ids must be a non-empty (T,) or (1, T) sequence, got shape {ids.shape}")
        if ids.size > self.config.max_position_embeddings:
            raise ValueError(f"{ids.size} tokens exceed BERT's {self.config.max_position_embeddings} positions; "
                             "split the text into shorter sentences")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        hs = self.forward_hidden(mx.array(ids.astype(np.int32))[None], n_layers)
        mx.eval(hs)
        return [np.array(h[0].astype(mx.float32)) for h in hs]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with `[CLS]`/`[SEP]`, as the HF tokenizer of the folder gives them."""
        if self._tokenizer is None:
            raise ValueError("this BERT was built without a tokenizer; load it with load_bert(folder)")
        return list(self._tokenizer.encode(text).ids)

    def phone_features(self, norm_text: str, word2ph: Sequence[int]) -> np.ndarray:
        """Phone-level features `(hidden, sum(word2ph))` of normalised Chinese text, as GPT-SoVITS builds them.

        Tokens of `norm_text` -> `hidden_states[-3]` -> drop `[CLS]`/`[SEP]` -> repeat row i `word2ph[i]` times.
        `word2ph` has one entry per character of `norm_text` (the Chinese frontend's output).
        """
        ids = self.tokenize(norm_text)
        word2ph = checked_word2ph(norm_text, word2ph, len(ids))
        hidden = self.hidden_states(ids, n_layers=self.phone_feature_layer)[-1][1:-1]  # (chars, hidden)
        return np.ascontiguousarray(np.repeat(hidden[: len(word2ph)], word2ph, axis=0).T)

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map HF BERT state-dict names to this module's parameters (pure, idempotent).

        Keeps `bert.embeddings.*` and `bert.encoder.*`; adds the `bert.` prefix for `BertModel` saves;
        renames old Google-style LayerNorm `gamma`/`beta`; drops the pooler, the MLM head (`cls.*`) and
        the `position_ids`/`token_type_ids` buffers; casts to float32.
        """
        out: dict[str, np.ndarray] = {}
        for key, value in weights.items():
            if not key.startswith(("bert.", "cls.")):
                key = "bert." + key
            if key.startswith(("cls.", "bert.pooler.")) or key.endswith(("position_ids", "token_type_ids")):
                continue
            if ".LayerNorm." in key:
                key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
            out[key] = np.ascontiguousarray(value, dtype=np.float32)
        return out


def checked_word2ph(norm_text: str, word2ph: Sequence[int], n_tokens: int) -> list[int]:
    """`word2ph` as ints, checked against the text and its token count (with [CLS]/[SEP]).

    Shared by every BERT backend's `phone_features` (MLX here, Core ML in coreml/runtime.py).
    """
    word2ph = [int(n) for n in word2ph]
    if len(word2ph) != len(norm_text):
        raise ValueError(f"word2ph has {len(word2ph)} entries but norm_text has {len(norm_text)} characters; "
                         "pass the norm_text and word2ph that the Chinese frontend returned together")
    if any(n < 0 for n in word2ph):
        raise ValueError("word2ph entries must be >= 0")
    n_chars = n_tokens - 2
    if n_chars < len(word2ph):
        raise ValueError(f"norm_text {norm_text!r} gives {n_chars} tokens for {len(word2ph)} characters; "
                         "BERT features need one token per character (Chinese text only)")
    if n_chars > len(word2ph):
        logger.warning("norm_text %r gives %d tokens for %d characters; using the first ones as upstream does",
                       norm_text, n_chars, len(word2ph))
    return word2ph


def load_tokenizer(folder: str | Path):
    """The folder's WordPiece tokenizer: `tokenizer.json`, else `vocab.txt` (lower-cased, Chinese chars split)."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    folder = Path(folder)
    tj, vocab = folder / "tokenizer.json", folder / "vocab.txt"
    if tj.exists():
        return Tokenizer.from_file(str(tj))
    if vocab.exists():
        # the settings of chinese-roberta-wwm-ext-large's tokenizer.json normaliser
        return BertWordPieceTokenizer(str(vocab), clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                      lowercase=True)
    raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt; copy the chinese-roberta-wwm-ext-large "
                            "folder from the PrimeSpeech download into place")


def load_bert(folder: str | Path, *, dtype: mx.Dtype = mx.float32) -> BertEncoderModel:
    """Load chinese-roberta-wwm-ext-large from an HF folder (`model.safetensors` or `pytorch_model.bin`, no torch).

    Every encoder parameter must come from the file (strict load). fp32 compute by default;
    `dtype=mx.float16` (opt-in, the engine's lower precisions) stores and runs it in fp16, halving its
    1.3 GB (LayerNorm and attention softmax accumulate in float32 inside `mx.fast`; features are
    returned as float32; error bound in tests/test_precision.py).
    """
    folder = Path(folder)
    cfg = read_hf_config(folder, BertConfig)
    model = BertEncoderModel(cfg, load_tokenizer(folder))
    weights = model.sanitize(load_hf_weights_cached(folder))
    # tensor by tensor, each numpy source dropped at once: loading never holds two copies of the 1.3 GB
    # model (the peak memory of three nodes starting together)
    load_strict(model, weights, folder, what="BERT", dtype=dtype,
                hint="use the chinese-roberta-wwm-ext-large folder from the PrimeSpeech download")
    model.eval()
    logger.info("loaded BERT from %s", folder)
    return model
