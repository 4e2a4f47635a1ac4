"""A smoke voice: random weights in the real PrimeSpeech layout, written without torch.

`build_smoke_model_dir(out)` writes a `$PRIMESPEECH_MODEL_DIR` whose `moyoyo/` holds every file
the engine loads, at the real (full) sizes and in the real formats (fp16 GPT `.ckpt` and SoVITS
`.pth`, HF encoder folders with `pytorch_model.bin`, a reference clip), under the file names of the
built-in Doubao voice; the other built-in voice ids are linked to the same files. Its audio is
noise, not speech: the demo and tests use it where no real models are installed.

The random weights are made non-degenerate the way the oracle's are (oracle.md 3.3): every layer
is drawn separately, norms and biases are perturbed, `weight_g` differs from `||weight_v||`, the
VQ codebook is random, residual branches of the GPT are scaled down (so 24 post-norm layers do not
collapse to one repeated token) and EOS is made rare, and the vocoder's input and output
convolutions are scaled up so the waveform follows its input at a speech-like level.

The output depends only on `seed` and `SMOKE_FORMAT_VERSION` (bump it whenever the bytes change),
so callers may cache the folder under both: `ensure_smoke_model_dir()` does, in
`$DORA_PRIMESPEECH_MLX_CACHE` (default `~/.cache/dora-primespeech-mlx`).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import math
import os
import shutil
import time
import wave
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .constants import cache_home
from .voices import BUILTIN_FILE, CUSTOM_BASE_VOICE, _entries, _voice_from_entry, read_json_file
from .weights import HParams
from .weights.writer import write_hf_folder, write_torch_file, write_wordpiece_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FILE",
    "MARKER_FILE",
    "SMOKE_FORMAT_VERSION",
    "Param",
    "as_hparams",
    "bert_config",
    "bert_params",
    "build_smoke_model_dir",
    "ensure_smoke_model_dir",
    "gpt_config",
    "gpt_params",
    "hubert_config",
    "hubert_params",
    "materialize",
    "smoke_cache_dir",
    "smoke_vocab",
    "sovits_config",
    "sovits_params",
]

SMOKE_FORMAT_VERSION = 1
MARKER_FILE = "SMOKE_VOICE_NOT_SPEECH.txt"
MANIFEST_FILE = "smoke.json"  # written last: its presence means the folder is complete
REFERENCE_SECONDS = 3.6  # the engine accepts 3-10 s references; short keeps the GPT prompt small
# upstream's my_save writes through "<time.time()>.pth", so real files carry such a zip folder name
ARCHIVE_STEM = "1726000000.123456"


# ------------------------------------------------------------------------------------ configs


def gpt_config() -> dict[str, Any]:
    """The GPT `.ckpt` `config`: s1longer-v2.yaml plus the keys the training script adds."""
    return {
        "train": {"seed": 1234, "epochs": 20, "batch_size": 8, "save_every_n_epoch": 1, "precision": "16-mixed",
                  "gradient_clip": 1.0, "if_save_latest": True, "if_save_every_weights": True,
                  "half_weights_save_dir": "GPT_weights_v2", "exp_name": "smoke-voice"},
        "optimizer": {"lr": 0.01, "lr_init": 1e-05, "lr_end": 0.0001, "warmup_steps": 2000, "decay_steps": 40000},
        "data": {"max_eval_sample": 8, "max_sec": 54, "num_workers": 4, "pad_val": 1024},
        "model": {"vocab_size": 1025, "phoneme_vocab_size": 732, "embedding_dim": 512, "hidden_dim": 512,
                  "head": 16, "linear_units": 2048, "n_layer": 24, "dropout": 0, "EOS": 1024, "random_bert": 0},
        "inference": {"top_k": 15},
        "output_dir": "logs/smoke-voice/logs_s1_v2",
    }


def sovits_config() -> dict[str, Any]:
    """The SoVITS `.pth` `config` (s2.json for v2 plus the training script's keys), as plain dicts."""
    return {
        "train": {"log_interval": 100, "eval_interval": 500, "seed": 1234, "epochs": 100, "learning_rate": 0.0001,
                  "betas": [0.8, 0.99], "eps": 1e-09, "batch_size": 32, "fp16_run": True, "lr_decay": 0.999875,
                  "segment_size": 20480, "init_lr_ratio": 1, "warmup_epochs": 0, "c_mel": 45, "c_kl": 1.0,
                  "text_low_lr_rate": 0.4, "if_save_latest": True, "if_save_every_weights": True,
                  "save_every_epoch": 4, "gpu_numbers": "0"},
        "data": {"max_wav_value": 32768.0, "sampling_rate": 32000, "filter_length": 2048, "hop_length": 640,
                 "win_length": 2048, "n_mel_channels": 128, "mel_fmin": 0.0, "mel_fmax": None, "add_blank": True,
                 "n_speakers": 300, "cleaned_text": True, "exp_dir": "logs/smoke-voice"},
        "model": {"inter_channels": 192, "hidden_channels": 192, "filter_channels": 768, "n_heads": 2,
                  "n_layers": 6, "kernel_size": 3, "p_dropout": 0.1, "resblock": "1",
                  "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                  "upsample_rates": [10, 8, 2, 2, 2], "upsample_initial_channel": 512,
                  "upsample_kernel_sizes": [16, 16, 8, 2, 2], "n_layers_q": 3, "use_spectral_norm": False,
                  "gin_channels": 512, "semantic_frame_rate": "25hz", "freeze_quantizer": True, "version": "v2"},
        "s2_ckpt_dir": "logs/s2/big2k1",
        "content_module": "cnhubert",
        "version": "v2",
        "name": "smoke-voice",
        "save_weight_dir": "SoVITS_weights_v2",
        "pretrain": None,
        "resume_step": None,
    }


def hubert_config() -> dict[str, Any]:
    """config.json of chinese-hubert-base (HF `HubertConfig`, post-norm, group-norm feature extractor)."""
    return {
        "architectures": ["HubertModel"], "model_type": "hubert", "torch_dtype": "float16",
        "conv_bias": False, "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2], "num_feat_extract_layers": 7, "do_stable_layer_norm": False,
        "feat_extract_activation": "gelu", "feat_extract_norm": "group", "feat_proj_dropout": 0.0,
        "feat_proj_layer_norm": True, "hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "num_attention_heads": 12, "num_hidden_layers": 12,
        "num_conv_pos_embedding_groups": 16, "num_conv_pos_embeddings": 128, "initializer_range": 0.02,
        "hidden_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "final_dropout": 0.1,
        "layerdrop": 0.1, "apply_spec_augment": True, "mask_time_prob": 0.05, "mask_time_length": 10,
        "mask_feature_prob": 0.0, "mask_feature_length": 10, "vocab_size": 32, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2,
    }


HUBERT_PREPROCESSOR = {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                       "padding_side": "right", "padding_value": 0, "return_attention_mask": False,
                       "sampling_rate": 16000}


def bert_config() -> dict[str, Any]:
    """config.json of chinese-roberta-wwm-ext-large (a `BertForMaskedLM`)."""
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "torch_dtype": "float16",
        "vocab_size": 21128, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
        "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 2, "directionality": "bidi",
        "output_past": True, "use_cache": True,
    }


# ------------------------------------------------------------------------- parameter tables


@dataclass(frozen=True)
class Param:
    """One tensor of a state dict and how to draw it.

    kind: "uniform" U(-scale, scale) | "normal" N(0, scale) | "affine" 1 + N(0, scale) |
    "fill" the constant `scale` | "weight_g" ||ref|| over every axis but `dim`, times 1 + N(0, 0.1) |
    "copy" a copy of `ref` | "shared" the very array of `ref` (one storage in the file, as tied weights).
    `post` edits the drawn float32 array (e.g. makes the EOS row small).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    scale: float = 1.0
    ref: str | None = None
    dim: int = 0
    post: Callable[[np.ndarray], np.ndarray] | None = None


class _Table:
    """Builds a parameter list in state-dict order with the usual layer shapes."""

    def __init__(self) -> None:
        self.params: list[Param] = []

    def add(self, name: str, shape, kind: str, scale: float = 1.0, **kw) -> None:
        self.params.append(Param(name, tuple(int(s) for s in shape), kind, scale, **kw))

    def bias(self, name: str, n: int, scale: float = 0.05) -> None:
        self.add(name, (n,), "normal", scale)

    def linear(self, name: str, n_out: int, n_in: int, gain: float = 1.0, bias: bool = True,
               std: float | None = None) -> None:
        """`std` given: HF-style N(0, std); else torch's default U(+-1/sqrt(fan_in)), times `gain`."""
        if std is None:
            self.add(f"{name}.weight", (n_out, n_in), "uniform", gain / math.sqrt(n_in))
        else:
            self.add(f"{name}.weight", (n_out, n_in), "normal", gain * std)
        if bias:
            self.bias(f"{name}.bias", n_out)

    def conv(self, name: str, c_out: int, c_in: int, k: int, gain: float = 1.0, bias: bool = True,
             bias_scale: float = 0.05) -> None:
        self.add(f"{name}.weight", (c_out, c_in, k), "uniform", gain / math.sqrt(c_in * k))
        if bias:
            self.bias(f"{name}.bias", c_out, bias_scale)

    def conv_wn(self, name: str, c_out: int, c_in: int, k: int, transposed: bool = False,
                bias_scale: float = 0.05) -> None:
        """Weight-normed conv, legacy names in torch's order: bias, weight_g, weight_v."""
        shape = (c_in, c_out, k) if transposed else (c_out, c_in, k)  # ConvTranspose1d stores (in, out, k)
        self.bias(f"{name}.bias", c_out, bias_scale)
        self.add(f"{name}.weight_g", (shape[0], 1, 1), "weight_g", ref=f"{name}.weight_v")
        self.add(f"{name}.weight_v", shape, "uniform", 1.0 / math.sqrt(shape[1] * k))

    def norm(self, name: str, n: int, names: tuple[str, str] = ("weight", "bias")) -> None:
        self.add(f"{name}.{names[0]}", (n,), "affine", 0.1)
        self.bias(f"{name}.{names[1]}", n)


def gpt_params(config: dict[str, Any] | None = None) -> list[Param]:
    """The GPT `.ckpt` `weight` (Text2SemanticLightningModule state dict, prefix `model.`), in order."""
    m = (config or gpt_config())["model"]
    d, ffn, eos = m["hidden_dim"], 4 * m["hidden_dim"], m["EOS"]
    t = _Table()
    t.linear("model.bert_proj", d, 1024)
    t.add("model.ar_text_embedding.word_embeddings.weight", (m["phoneme_vocab_size"], d), "normal", 1.0)
    t.add("model.ar_text_position.alpha", (1,), "affine", 0.2)
    t.add("model.ar_audio_embedding.word_embeddings.weight", (m["vocab_size"], d), "normal", 1.0)
    t.add("model.ar_audio_position.alpha", (1,), "affine", 0.2)
    for i in range(m["n_layer"]):
        p = f"model.h.layers.{i}"
        # packed QKV as nn.MultiheadAttention initialises it (xavier uniform)
        t.add(f"{p}.self_attn.in_proj_weight", (3 * d, d), "uniform", math.sqrt(6.0 / (4 * d)))
        t.bias(f"{p}.self_attn.in_proj_bias", 3 * d)
        # residual branches x0.2: a random 24-layer post-norm stack otherwise repeats one token
        t.linear(f"{p}.self_attn.out_proj", d, d, gain=0.2)
        t.linear(f"{p}.linear1", ffn, d)
        t.linear(f"{p}.linear2", d, ffn, gain=0.2)
        t.norm(f"{p}.norm1", d)
        t.norm(f"{p}.norm2", d)

    def rare_eos(w: np.ndarray) -> np.ndarray:
        w[eos] *= 0.1  # real voices stop on EOS; a random one would stop at a random step
        return w

    t.add("model.ar_predict_layer.weight", (m["vocab_size"], d), "uniform", 1.0 / math.sqrt(d), post=rare_eos)
    return t.params


def _vits_encoder(t: _Table, name: str, n_layers: int, hidden: int, filter_channels: int, n_heads: int,
                  kernel: int, window: int = 4) -> None:
    """attentions.Encoder: four ModuleLists, each listed whole before the next (state-dict order)."""
    k_channels = hidden // n_heads
    for i in range(n_layers):
        a = f"{name}.attn_layers.{i}"
        for rel in ("emb_rel_k", "emb_rel_v"):
            t.add(f"{a}.{rel}", (1, 2 * window + 1, k_channels), "normal", k_channels ** -0.5)
        for proj in ("conv_q", "conv_k", "conv_v", "conv_o"):
            t.conv(f"{a}.{proj}", hidden, hidden, 1)
    for i in range(n_layers):
        t.norm(f"{name}.norm_layers_1.{i}", hidden, ("gamma", "beta"))
    for i in range(n_layers):
        t.conv(f"{name}.ffn_layers.{i}.conv_1", filter_channels, hidden, kernel)
        t.conv(f"{name}.ffn_layers.{i}.conv_2", hidden, filter_channels, kernel)
    for i in range(n_layers):
        t.norm(f"{name}.norm_layers_2.{i}", hidden, ("gamma", "beta"))


def sovits_params(config: dict[str, Any] | None = None) -> list[Param]:
    """The SoVITS `.pth` `weight` (SynthesizerTrn v2 without `enc_q`, as process_ckpt saves it), in order."""
    cfg = config or sovits_config()
    m = cfg["model"]
    h, inter, filt = m["hidden_channels"], m["inter_channels"], m["filter_channels"]
    gin, ssl, mrte = m["gin_channels"], m.get("ssl_dim", 768), 512  # ssl_dim: absent from s2.json (tests shrink it)
    n_symbols = 732
    t = _Table()

    def enc(name: str, n_layers: int) -> None:
        _vits_encoder(t, name, n_layers, h, filt, m["n_heads"], m["kernel_size"])

    t.conv("enc_p.ssl_proj", h, ssl, 1)
    enc("enc_p.encoder_ssl", m["n_layers"] // 2)
    enc("enc_p.encoder_text", m["n_layers"])
    t.add("enc_p.text_embedding.weight", (n_symbols, h), "normal", h ** -0.5)
    for proj in ("conv_q", "conv_k", "conv_v", "conv_o"):
        t.conv(f"enc_p.mrte.cross_attention.{proj}", mrte, mrte, 1)
    t.conv("enc_p.mrte.c_pre", mrte, h, 1)
    t.conv("enc_p.mrte.text_pre", mrte, h, 1)
    t.conv("enc_p.mrte.c_post", h, mrte, 1)
    enc("enc_p.encoder2", m["n_layers"] // 2)
    t.conv("enc_p.proj", 2 * inter, h, 1)

    # HiFi-GAN: small biases, louder input and output convolutions, so the waveform follows z
    ch = m["upsample_initial_channel"]
    t.conv("dec.conv_pre", ch, inter, 7, gain=10.0, bias_scale=0.005)
    for i, (k, _rate) in enumerate(zip(m["upsample_kernel_sizes"], m["upsample_rates"])):
        t.conv_wn(f"dec.ups.{i}", ch // 2 ** (i + 1), ch // 2 ** i, k, transposed=True, bias_scale=0.005)
    for i in range(len(m["upsample_rates"])):
        c = ch // 2 ** (i + 1)
        for j, k in enumerate(m["resblock_kernel_sizes"]):
            for convs in ("convs1", "convs2"):
                for n in range(len(m["resblock_dilation_sizes"][j])):
                    t.conv_wn(f"dec.resblocks.{3 * i + j}.{convs}.{n}", c, c, k, bias_scale=0.005)
    t.conv("dec.conv_post", 1, ch // 2 ** len(m["upsample_rates"]), 7, gain=20.0, bias=False)
    t.conv("dec.cond", ch, gin, 1, bias_scale=0.005)

    # flow: 4 coupling layers (the Flip modules between them hold no tensors)
    half, wn_layers = inter // 2, 4
    for f in (0, 2, 4, 6):
        p = f"flow.flows.{f}"
        t.conv(f"{p}.pre", h, half, 1)
        for i in range(wn_layers):
            t.conv_wn(f"{p}.enc.in_layers.{i}", 2 * h, h, 5)
        for i in range(wn_layers):
            t.conv_wn(f"{p}.enc.res_skip_layers.{i}", 2 * h if i < wn_layers - 1 else h, h, 1)
        t.conv_wn(f"{p}.enc.cond_layer", 2 * h * wn_layers, gin, 1)
        # upstream zero-initialises `post` (an identity flow); random keeps the flow visible
        t.add(f"{p}.post.weight", (half, h, 1), "normal", 0.02)
        t.bias(f"{p}.post.bias", half)

    # ref_enc (MelStyleEncoder on the first 704 spectrogram bins)
    t.linear("ref_enc.spectral.0.fc", 128, 704)
    t.linear("ref_enc.spectral.3.fc", 128, 128)
    for i in range(2):
        t.conv(f"ref_enc.temporal.{i}.conv1.conv", 256, 128, 5)
    for proj in ("w_qs", "w_ks", "w_vs", "fc"):
        t.linear(f"ref_enc.slf_attn.{proj}", 128, 128)
    t.linear("ref_enc.fc.fc", gin, 128)

    t.conv("ssl_proj", ssl, ssl, 2)
    cb = "quantizer.vq.layers.0._codebook"
    t.add(f"{cb}.inited", (1,), "fill", 1.0)
    t.add(f"{cb}.cluster_size", (1024,), "fill", 1.0)
    # codes at the scale of the projected HuBERT features (std ~0.6): the nearest-code search then
    # follows the input instead of the code norms, and a clip maps to dozens of distinct codes
    t.add(f"{cb}.embed", (1024, ssl), "normal", 0.25)
    t.add(f"{cb}.embed_avg", (1024, ssl), "copy", ref=f"{cb}.embed")
    return t.params


def hubert_params(config: dict[str, Any] | None = None) -> list[Param]:
    """chinese-hubert-base's `pytorch_model.bin` (HubertModel, legacy weight-norm names), in order."""
    c = config or hubert_config()
    d, std = c["hidden_size"], c["initializer_range"]
    t = _Table()
    t.add("masked_spec_embed", (d,), "uniform", 1.0)
    c_in = 1
    for i, (c_out, k) in enumerate(zip(c["conv_dim"], c["conv_kernel"])):
        # kaiming normal, as HF initialises the feature extractor
        t.add(f"feature_extractor.conv_layers.{i}.conv.weight", (c_out, c_in, k), "normal", math.sqrt(2.0 / (c_in * k)))
        if i == 0:
            t.norm("feature_extractor.conv_layers.0.layer_norm", c_out)
        c_in = c_out
    t.norm("feature_projection.layer_norm", c_in)
    t.linear("feature_projection.projection", d, c_in, std=std)
    k, groups = c["num_conv_pos_embeddings"], c["num_conv_pos_embedding_groups"]
    pos = "encoder.pos_conv_embed.conv"
    t.bias(f"{pos}.bias", d)
    # HuBERT's positional conv is weight-normed over the kernel axis (dim=2)
    t.add(f"{pos}.weight_g", (1, 1, k), "weight_g", ref=f"{pos}.weight_v", dim=2)
    t.add(f"{pos}.weight_v", (d, d // groups, k), "normal", 2.0 * math.sqrt(1.0 / (k * d)))
    t.norm("encoder.layer_norm", d)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t.linear(f"{p}.attention.{proj}", d, d, std=std)
        t.norm(f"{p}.layer_norm", d)
        t.linear(f"{p}.feed_forward.intermediate_dense", c["intermediate_size"], d, std=std)
        t.linear(f"{p}.feed_forward.output_dense", d, c["intermediate_size"], std=std)
        t.norm(f"{p}.final_layer_norm", d)
    return t.params


def bert_params(config: dict[str, Any] | None = None) -> list[Param]:
    """chinese-roberta-wwm-ext-large's `pytorch_model.bin` (BertForMaskedLM; the decoder weight, tied to
    the word embeddings, is not stored; the decoder bias is the MLM bias itself), in order."""
    c = config or bert_config()
    d, std = c["hidden_size"], c["initializer_range"]
    t = _Table()
    e = "bert.embeddings"
    t.add(f"{e}.word_embeddings.weight", (c["vocab_size"], d), "normal", std)
    t.add(f"{e}.position_embeddings.weight", (c["max_position_embeddings"], d), "normal", std)
    t.add(f"{e}.token_type_embeddings.weight", (c["type_vocab_size"], d), "normal", std)
    t.norm(f"{e}.LayerNorm", d)
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            t.linear(f"{p}.attention.self.{proj}", d, d, std=std)
        t.linear(f"{p}.attention.output.dense", d, d, std=std)
        t.norm(f"{p}.attention.output.LayerNorm", d)
        t.linear(f"{p}.intermediate.dense", c["intermediate_size"], d, std=std)
        t.linear(f"{p}.output.dense", d, c["intermediate_size"], std=std)
        t.norm(f"{p}.output.LayerNorm", d)
    t.bias("cls.predictions.bias", c["vocab_size"])
    t.linear("cls.predictions.transform.dense", d, d, std=std)
    t.norm("cls.predictions.transform.LayerNorm", d)
    t.add("cls.predictions.decoder.bias", (c["vocab_size"],), "shared", ref="cls.predictions.bias")
    return t.params


def materialize(params: list[Param], rng: np.random.Generator, dtype=np.float16) -> collections.OrderedDict:
    """Draw every tensor of `params` (float32 maths, stored as `dtype`), keeping the table's order."""
    out: collections.OrderedDict[str, np.ndarray | None] = collections.OrderedDict((p.name, None) for p in params)
    deferred = []
    for p in params:
        if p.kind == "uniform":
            w = rng.uniform(-p.scale, p.scale, size=p.shape).astype(np.float32)
        elif p.kind == "normal":
            w = rng.standard_normal(size=p.shape, dtype=np.float32) * np.float32(p.scale)
        elif p.kind == "affine":
            w = 1.0 + rng.standard_normal(size=p.shape, dtype=np.float32) * np.float32(p.scale)
        elif p.kind == "fill":
            w = np.full(p.shape, p.scale, dtype=np.float32)
        elif p.kind in ("weight_g", "copy", "shared"):
            deferred.append(p)
            continue
        else:
            raise ValueError(f"{p.name}: unknown parameter kind {p.kind!r}")
        if p.post is not None:
            w = p.post(w)
        out[p.name] = w.astype(dtype)
    for p in deferred:  # these derive from a tensor drawn above
        ref = out[p.ref]
        if p.kind == "weight_g":
            v = ref.astype(np.float32)
            axes = tuple(a for a in range(v.ndim) if a != p.dim)
            norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
            # weight_g != ||v||, so a loader that ignores g is caught
            w = norm * (1.0 + 0.1 * rng.standard_normal(size=norm.shape, dtype=np.float32))
            out[p.name] = w.reshape(p.shape).astype(dtype)
        elif p.kind == "copy":
            out[p.name] = ref.copy()
        else:
            out[p.name] = ref
    return out


# ---------------------------------------------------------------------------- other files


def smoke_vocab(size: int = 21128) -> list[str]:
    """A BERT-Chinese-like WordPiece vocabulary of `size` tokens: the special tokens at BERT's ids
    (`[PAD]`=0, `[UNK]`=100, `[CLS]`=101, `[SEP]`=102, `[MASK]`=103), ASCII, CJK punctuation and
    the CJK ideographs from U+4E00 on, so Chinese text tokenises one token per character."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]
    vocab += list("，。！？、；：…—·“”‘’《》（）【】～")
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    cp = 0x4E00
    while len(vocab) < size and cp <= 0x9FFF:
        vocab.append(chr(cp))
        cp += 1
    if len(vocab) < size:
        raise ValueError(f"a smoke vocabulary has at most {len(vocab)} tokens, asked for {size}")
    return vocab[:size]


def synthetic_reference(seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A speech-like clip: a gliding voiced source (harmonics) in syllable bursts, with breath noise."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    f0 = 170.0 + 35.0 * np.sin(2 * np.pi * 0.45 * t) + 10.0 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h ** 1.2 for h in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 3.7 * t + 0.5 * np.sin(2 * np.pi * 0.8 * t)), 0, None) ** 1.5
    onset = np.minimum(1.0, t / 0.05) * np.minimum(1.0, (t[-1] - t) / 0.05)  # no clicks at the ends
    audio = (0.25 * voiced * syllables + 0.01 * rng.standard_normal(n)) * onset
    return audio.astype(np.float32)


def write_wav_pcm16(path: Path, audio: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV (stdlib `wave`)."""
    pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32767.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def as_hparams(config: dict) -> HParams:
    """Nested dicts -> nested `HParams` (pickled as GPT-SoVITS `utils.HParams`, as real `.pth` files)."""
    return HParams({k: as_hparams(v) if isinstance(v, dict) else v for k, v in config.items()})


def _link(target: Path, link: Path) -> None:
    """A relative symlink (the folder may be moved or renamed), or a hard link where there are none."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), link)
    except OSError:
        os.link(target, link)


# ---------------------------------------------------------------------------------- building


def build_smoke_model_dir(out: str | os.PathLike, seed: int = 0, *, link_all_voices: bool = True) -> Path:
    """Write a complete random-weight `$PRIMESPEECH_MODEL_DIR` at `out` and return it.

    `out/moyoyo/` gets the built-in Doubao voice's GPT `.ckpt`, SoVITS `.pth` and reference clip,
    plus `chinese-hubert-base/` and `chinese-roberta-wwm-ext-large/` (about 1.1 GB in all, the real
    sizes). With `link_all_voices` every other built-in voice id points at the same files, so
    `VOICE:<id>` switches work. Same `seed`, same bytes. `out` must not exist yet or be empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or build the smoke voice elsewhere")
    t0 = time.perf_counter()
    moyoyo = out / "moyoyo"
    # the built-in registry only: a user's voices file must not rename the smoke files
    data, problem = read_json_file(BUILTIN_FILE)
    if problem:
        raise RuntimeError(f"{BUILTIN_FILE} {problem}: the package is damaged; reinstall dora-primespeech-mlx")
    builtin = {v.id: v for v in (_voice_from_entry(e, moyoyo, str(BUILTIN_FILE)) for e in _entries(data))}
    voice = builtin[CUSTOM_BASE_VOICE]  # Doubao: the voice the smoke files are named after
    seeds = np.random.SeedSequence(seed).spawn(5)  # one independent stream per file
    timings: dict[str, float] = {}

    def timed(name: str, make: Callable[[], Any]) -> None:
        t = time.perf_counter()
        make()
        timings[name] = round(time.perf_counter() - t, 2)

    gpt_cfg = gpt_config()
    timed("gpt", lambda: write_torch_file(voice.gpt_weights, collections.OrderedDict(
        weight=materialize(gpt_params(gpt_cfg), np.random.default_rng(seeds[0])), config=gpt_cfg,
        info="GPT-e15"), archive_name=ARCHIVE_STEM))
    sov_cfg = sovits_config()
    timed("sovits", lambda: write_torch_file(voice.sovits_weights, collections.OrderedDict(
        weight=dict(materialize(sovits_params(sov_cfg), np.random.default_rng(seeds[1]))),
        config=as_hparams(sov_cfg), info="96epoch_5376iteration"), archive_name=ARCHIVE_STEM))
    hub_cfg = hubert_config()
    timed("hubert", lambda: write_hf_folder(
        moyoyo / "chinese-hubert-base", hub_cfg,
        materialize(hubert_params(hub_cfg), np.random.default_rng(seeds[2])),
        extra_files={"preprocessor_config.json": HUBERT_PREPROCESSOR}))
    bert_cfg = bert_config()
    bert_dir = moyoyo / "chinese-roberta-wwm-ext-large"
    timed("bert", lambda: write_hf_folder(
        bert_dir, bert_cfg, materialize(bert_params(bert_cfg), np.random.default_rng(seeds[3]))))
    write_wordpiece_tokenizer(bert_dir, smoke_vocab(bert_cfg["vocab_size"]))
    write_wav_pcm16(voice.reference_audio, synthetic_reference(REFERENCE_SECONDS, 32000, np.random.default_rng(seeds[4])),
                    32000)

    linked = []
    if link_all_voices:
        for vid, other in builtin.items():
            for dst, src in ((other.gpt_weights, voice.gpt_weights), (other.sovits_weights, voice.sovits_weights),
                             (other.reference_audio, voice.reference_audio)):
                if not dst.exists():
                    _link(src, dst)
            linked.append(vid)
    (out / MARKER_FILE).write_text(
        "SMOKE VOICE: random weights in the real GPT-SoVITS v2 layout, written by dora_primespeech_mlx.smoke.\n"
        "Audio synthesised from this directory is noise, not speech.\n")
    manifest = {"format_version": SMOKE_FORMAT_VERSION, "seed": seed, "numpy": np.__version__,
                "voices": linked or [voice.id], "timings": timings,
                "seconds": round(time.perf_counter() - t0, 2)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("smoke voice written to %s in %.1f s", out, manifest["seconds"])
    return out


def smoke_cache_dir(seed: int = 0) -> Path:
    """Where `ensure_smoke_model_dir(seed)` keeps the smoke voice."""
    return cache_home() / f"smoke-v{SMOKE_FORMAT_VERSION}-seed{seed}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_smoke_model_dir(seed: int = 0) -> Path:
    """The cached smoke voice for `seed` (built once, about 1.1 GB; later calls return at once).

    Concurrent callers wait for one build; an interrupted build never leaves a folder that looks
    complete (it is written under a temporary name and renamed into place).
    """
    final = smoke_cache_dir(seed)
    if (final / MANIFEST_FILE).is_file():
        return final
    with _locked(final.with_name(f".{final.name}.lock")):
        if (final / MANIFEST_FILE).is_file():
            return final
        tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_smoke_model_dir(tmp, seed)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an older layout
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
