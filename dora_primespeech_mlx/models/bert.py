"""chinese-roberta-wwm-ext-large in MLX: Chinese text -> 1024-d phone-level features.

Despite its name the checkpoint is a plain post-norm BERT (`BertForMaskedLM`); GPT-SoVITS uses
`hidden_states[-3]` (the output of layer 22 of 24) with the `[CLS]`/`[SEP]` rows dropped, each
character's row repeated `word2ph[i]` times. Layers past the one needed (the last two), the pooler
and the MLM head are never loaded or run: `load_bert` checks they are in the file, then leaves them
there. Attribute paths mirror the HF keys (`bert.encoder.layer.{i}.attention.self.query`, ...).
Tokenisation uses the `tokenizers` library (tokenizer.json, or vocab.txt), never transformers.

Memory (issue 20, item 6): the weights are read tensor by tensor from a memory map of the
safetensors file (the folder's own, or the conversion cache's copy of `pytorch_model.bin`), so
loading never holds the file whole. `load_bert(streamed=True)` keeps the layers in that map instead
of in MLX memory: each forward copies one layer in, runs it and lets it go, so the processes that map
the same file share one copy of the weights in the page cache (same numbers, slower: the opt-in
low-memory preset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..weights import CheckpointError, check_float, check_int, release_freed_memory
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

    def __call__(self, input_ids: mx.array, words: mx.array | None = None) -> mx.array:
        """`words`: the word-embedding rows of `input_ids`, where the table is not held (streamed)."""
        t = input_ids.shape[1]
        words = self.word_embeddings(input_ids) if words is None else words
        # token_type_ids are all 0 for a single sentence, positions start at 0
        x = words + self.token_type_embeddings.weight[0] + self.position_embeddings.weight[:t]
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
    def __init__(self, cfg: BertConfig, n_layers: int):
        super().__init__()
        self.layer = [BertLayer(cfg) for _ in range(n_layers)]


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig, n_layers: int):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, n_layers)


@dataclass
class _Streamed:
    """Layer weights left in the file's memory map (`load_bert(streamed=True)`)."""

    source: Path
    dtype: mx.Dtype
    words: np.ndarray  # (vocab, hidden) word-embedding table, a view of the map
    layers: list[dict[str, np.ndarray]]  # per layer: parameter name -> view of the map
    slot: BertLayer  # the one layer module the weights are copied into, layer by layer


class BertEncoderModel(nn.Module):
    """The `bert.*` part of `BertForMaskedLM` (no pooler, no MLM head), plus its tokenizer.

    `n_layers` (default: all) is how many encoder layers it holds; `load_bert` builds only those the
    phone features use (`phone_feature_layer`)."""

    def __init__(self, cfg: BertConfig, tokenizer=None, *, n_layers: int | None = None):
        super().__init__()
        self.config = cfg
        n = cfg.num_hidden_layers if n_layers is None else n_layers
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"n_layers must be in [0, {cfg.num_hidden_layers}], got {n}")
        self.bert = BertModel(cfg, n)
        self._n_layers = n
        self._tokenizer = tokenizer
        self._streamed: _Streamed | None = None

    @property
    def n_layers(self) -> int:
        """Encoder layers this model can run (held in memory, or streamed from the file)."""
        return self._n_layers

    @property
    def phone_feature_layer(self) -> int:
        """Index into `hidden_states` of the features GPT-SoVITS uses: `hidden_states[-3]`."""
        return self.config.num_hidden_layers - 2

    def forward_hidden(self, input_ids: mx.array, n_layers: int | None = None) -> list[mx.array]:
        """Embedding output then the outputs of the first `n_layers` layers (default: all it holds),
        each (B, T, hidden)."""
        n = self._n_layers if n_layers is None else n_layers
        if n > self._n_layers:
            raise ValueError(f"this BERT holds {self._n_layers} of {self.config.num_hidden_layers} layers, "
                             f"{n} were asked for")
        st = self._streamed
        if st is None:
            x = self.bert.embeddings(input_ids)
            out = [x]
            for layer in self.bert.encoder.layer[:n]:
                x = layer(x)
                out.append(x)
            return out
        # streamed: the table's rows and each layer's weights copied in from the map when needed;
        # each output is evaluated before the next layer's weights replace this one's
        words = mx.array(st.words[np.asarray(input_ids)]).astype(st.dtype)
        x = self.bert.embeddings(input_ids, words)
        mx.eval(x)
        out = [x]
        for i in range(n):
            load_strict(st.slot, dict(st.layers[i]), st.source, what=f"BERT layer {i}", dtype=st.dtype,
                        hint="the file changed under the running engine; restart it")
            x = st.slot(x)
            mx.eval(x)
            out.append(x)
        st.slot = BertLayer(self.config)  # the last layer's weights go too (a fresh layer's are lazy: no memory)
        # the layers' copies go back to the OS now, not to MLX's buffer cache and the heap (~30 MB a call)
        mx.clear_cache()
        release_freed_memory()
        return out

    def hidden_states(self, input_ids: Sequence[int] | np.ndarray, n_layers: int | None = None) -> list[np.ndarray]:
        """HF `output_hidden_states` for one sequence: `[embeddings, layer 1, ..., layer n]`, each (T, hidden).

        `input_ids` is `(T,)` or `(1, T)` token ids including `[CLS]`/`[SEP]`; `n_layers` (default:
        all) limits how many layers run.
        """
        hs = self.forward_hidden(self._checked_ids(input_ids), n_layers)
        mx.eval(hs)
        return [np.array(h[0].astype(mx.float32)) for h in hs]

    def _checked_ids(self, input_ids: Sequence[int] | np.ndarray) -> mx.array:
        """`input_ids` as (1, T) int32 after checking their shape, count and range."""
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
        return mx.array(ids.astype(np.int32))[None]

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
        return np.ascontiguousarray(np.array(self.phone_features_array(norm_text, word2ph)))

    def phone_features_array(self, norm_text: str, word2ph: Sequence[int]) -> mx.array:
        """`phone_features` as a lazy float32 MLX array: on a GPU the features stay on the device and
        nothing waits for them until the GPT's prefill needs them (no copy of every layer's states
        to the host, no host sync between the text and the first token)."""
        ids = self.tokenize(norm_text)
        word2ph = checked_word2ph(norm_text, word2ph, len(ids))
        hidden = self.forward_hidden(self._checked_ids(ids), self.phone_feature_layer)[-1][0, 1:-1]  # (chars, hidden)
        rows = mx.array(np.repeat(np.arange(len(word2ph), dtype=np.int32), word2ph))
        return mx.take(hidden, rows, axis=0).T.astype(mx.float32)

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map HF BERT state-dict names to the full model's parameters (pure, idempotent).

        Keeps `bert.embeddings.*` and `bert.encoder.*` (every layer: `load_bert` checks the ones it
        leaves out); adds the `bert.` prefix for `BertModel` saves; renames old Google-style LayerNorm
        `gamma`/`beta`; drops the pooler, the MLM head (`cls.*`) and the `position_ids`/`token_type_ids`
        buffers. Values are passed through untouched (memory-mapped views stay unread); the loader casts.
        """
        out: dict[str, np.ndarray] = {}
        for key, value in weights.items():
            if not key.startswith(("bert.", "cls.")):
                key = "bert." + key
            if key.startswith(("cls.", "bert.pooler.")) or key.endswith(("position_ids", "token_type_ids")):
                continue
            if ".LayerNorm." in key:
                key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
            out[key] = value
        return out

    def take_layers(self, weights: dict[str, np.ndarray], first: int, stop: int,
                    source: str | Path) -> list[dict[str, np.ndarray]]:
        """Remove encoder layers `first..stop-1` from sanitized `weights` and return them, one dict per
        layer (names relative to the layer), after checking each holds exactly a layer's tensors with
        their shapes (so a file missing a layer is refused even where that layer never runs)."""
        template = {k: tuple(v.shape) for k, v in tree_flatten(BertLayer(self.config).parameters())}  # lazy: no memory
        layers = []
        for i in range(first, stop):
            prefix = f"bert.encoder.layer.{i}."
            got = {k[len(prefix):]: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
            missing, unexpected = sorted(set(template) - set(got)), sorted(set(got) - set(template))
            bad = [k for k in template if k in got and tuple(got[k].shape) != template[k]]
            if missing or unexpected or bad:
                what = (f"missing {prefix}{missing[0]}" if missing else f"unexpected {prefix}{unexpected[0]}"
                        if unexpected else f"{prefix}{bad[0]} has shape {tuple(got[bad[0]].shape)}, not {template[bad[0]]}")
                raise CheckpointError(f"{source}: the BERT weights do not match the model: {what}; use the "
                                      "chinese-roberta-wwm-ext-large folder from the PrimeSpeech download")
            layers.append(got)
        return layers


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


def load_bert(folder: str | Path, *, dtype: mx.Dtype = mx.float32, streamed: bool = False) -> BertEncoderModel:
    """Load chinese-roberta-wwm-ext-large from an HF folder (`model.safetensors` or `pytorch_model.bin`, no torch).

    Only the layers the phone features use are loaded (22 of 24: `hidden_states[-3]`); the file must
    still hold every layer (strict: names and shapes of all of them are checked). fp32 compute by
    default; `dtype=mx.float16` (opt-in, the engine's lower precisions) stores and runs it in fp16,
    halving its memory (LayerNorm and attention softmax accumulate in float32 inside `mx.fast`;
    features are returned as float32; error bound in tests/test_precision.py).

    `streamed=True` (the engine's MEMORY_PRESET=low) leaves the layers and the word-embedding table
    in the file's memory map and copies each in, cast to `dtype`, when a forward needs it: the same
    features to the bit, in a fraction of the memory (the map's pages are shared between processes),
    for a copy of the weights per forward. Falls back to holding them where there is no safetensors
    file to map (a conversion cache that cannot be written).
    """
    folder = Path(folder)
    cfg = read_hf_config(folder, BertConfig)
    n = max(cfg.num_hidden_layers - 2, 0)  # hidden_states[-3]: the output of layer n
    model = BertEncoderModel(cfg, load_tokenizer(folder), n_layers=n)
    # memory-mapped views where a safetensors file holds the weights: each tensor is read as it is
    # converted, and dropped at once, so loading never holds the file (the peak of three nodes starting)
    weights = model.sanitize(load_hf_weights_cached(folder, mapped=True))
    layers = model.take_layers(weights, 0, cfg.num_hidden_layers, folder)
    words = weights.get("bert.embeddings.word_embeddings.weight")
    views = [words] + [v for layer in layers for v in layer.values()]
    if streamed and words is not None and all(isinstance(v, np.memmap) for v in views):
        if tuple(words.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(f"{folder}: the BERT word embeddings have shape {tuple(words.shape)}, not "
                                  f"{(cfg.vocab_size, cfg.hidden_size)}; use the chinese-roberta-wwm-ext-large folder "
                                  "from the PrimeSpeech download")
        del weights["bert.embeddings.word_embeddings.weight"]
        del model.bert.embeddings["word_embeddings"]  # the table stays in the map: rows are gathered there
        model.bert.encoder.layer = []
        slot = BertLayer(cfg)
        model._streamed = _Streamed(folder, dtype, words, layers[:n], slot)
    else:
        for i, layer in enumerate(layers[:n]):
            weights.update({f"bert.encoder.layer.{i}.{k}": v for k, v in layer.items()})
    del layers, views, words
    load_strict(model, weights, folder, what="BERT", dtype=dtype,
                hint="use the chinese-roberta-wwm-ext-large folder from the PrimeSpeech download")
    model.eval()
    logger.info("loaded BERT from %s (%d of %d layers%s)", folder, n, cfg.num_hidden_layers,
                ", streamed from the file" if model._streamed else "")
    return model
