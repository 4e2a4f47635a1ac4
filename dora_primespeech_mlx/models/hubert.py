"""CNHubert (chinese-hubert-base) in MLX: raw 16 kHz waveform -> last hidden state (768, T).

GPT-SoVITS calls the inner `transformers.HubertModel` directly on the raw waveform, so the feature
extractor's zero-mean/unit-variance normalisation is bypassed; this module does the same. Only the
post-norm HuBERT-base variant that the checkpoint uses is implemented (`feat_extract_norm="group"`,
`do_stable_layer_norm=False`). Attribute paths mirror the HF state-dict keys, so `sanitize()` only
fuses the positional convolution's weight norm, transposes convolutions and drops `masked_spec_embed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..weights import (
    CheckpointError,
    check_float,
    check_int,
    check_int_list,
    check_state_dict,
    fuse_weight_norm,
    normalize_weight_norm_names,
)
from ..weights.cache import load_hf_weights_cached
from .base import ModelConfig, load_strict, read_hf_config

logger = logging.getLogger(__name__)

__all__ = ["HubertConfig", "HubertModel", "load_hubert"]


@dataclass
class HubertConfig(ModelConfig):
    """The fields of an HF `HubertConfig` (config.json) that inference needs; defaults are HuBERT-base."""

    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    feat_proj_layer_norm: bool = True
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    def __post_init__(self) -> None:
        # sane ranges (chinese-hubert-base: 7 x 512 convs, 768 x 12 layers): nothing is sized by a hostile config
        w = "HuBERT config.json"
        check_int_list(w, "conv_dim", self.conv_dim, 1, 4096, max_len=16)
        check_int_list(w, "conv_kernel", self.conv_kernel, 1, 1024, max_len=16)
        check_int_list(w, "conv_stride", self.conv_stride, 1, 1024, max_len=16)
        check_int(w, "hidden_size", self.hidden_size, 1, 8192)
        check_int(w, "num_hidden_layers", self.num_hidden_layers, 1, 128)
        check_int(w, "num_attention_heads", self.num_attention_heads, 1, 256)
        check_int(w, "intermediate_size", self.intermediate_size, 1, 65536)
        check_int(w, "num_conv_pos_embeddings", self.num_conv_pos_embeddings, 1, 1024)
        check_int(w, "num_conv_pos_embedding_groups", self.num_conv_pos_embedding_groups, 1, self.hidden_size)
        check_float(w, "layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, open_low=True)
        for name in ("conv_bias", "feat_proj_layer_norm", "do_stable_layer_norm"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{w}: {name} must be true or false")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"{w}: hidden_size must be a multiple of num_conv_pos_embedding_groups")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)):
            raise ValueError("HuBERT config.json: conv_dim, conv_kernel and conv_stride must have the same length")
        if self.feat_extract_norm != "group" or self.do_stable_layer_norm:
            raise ValueError(
                f"HuBERT config.json: feat_extract_norm={self.feat_extract_norm!r}, "
                f"do_stable_layer_norm={self.do_stable_layer_norm} is not supported; GPT-SoVITS uses "
                "chinese-hubert-base (feat_extract_norm='group', do_stable_layer_norm=false)"
            )
        for name in ("feat_extract_activation", "hidden_act"):
            if getattr(self, name) != "gelu":
                raise ValueError(f"HuBERT config.json: {name}={getattr(self, name)!r} is not supported (expected 'gelu')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("HuBERT config.json: hidden_size must be a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_weights(self, weights: dict[str, np.ndarray], source: str | Path) -> None:
        """Raise `CheckpointError` unless `weights` is a state dict whose convolution weights (the
        ones `sanitize` re-lays out) are 3-D; runs before `sanitize` and the strict load."""
        weights = check_state_dict(source, weights)
        pos = "encoder.pos_conv_embed.conv"
        names = [f"{pos}.weight", f"{pos}.weight_g", f"{pos}.weight_v",
                 *(f"feature_extractor.conv_layers.{i}.conv.weight" for i in range(len(self.conv_dim)))]
        for name in names:
            for key in (name, "hubert." + name):
                value = weights.get(key)
                if value is not None and len(value.shape) != 3:
                    raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, a convolution weight is "
                                          "3-D; the file is damaged or not chinese-hubert-base")


class HubertConvLayer(nn.Module):
    """Conv1d (no padding) [+ per-channel GroupNorm on layer 0] + GELU. Layout (B, T, C)."""

    def __init__(self, cfg: HubertConfig, layer_id: int):
        super().__init__()
        c_in = cfg.conv_dim[layer_id - 1] if layer_id > 0 else 1
        c_out = cfg.conv_dim[layer_id]
        self.conv = nn.Conv1d(c_in, c_out, cfg.conv_kernel[layer_id], stride=cfg.conv_stride[layer_id],
                              bias=cfg.conv_bias)
        if layer_id == 0:
            # one group per channel: each channel normalised over time, as torch GroupNorm(512, 512)
            self.layer_norm = nn.GroupNorm(c_out, c_out, eps=1e-5, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv(x)
        if "layer_norm" in self:
            x = self.layer_norm(x)
        return nn.gelu(x)


class HubertFeatureEncoder(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.conv_layers = [HubertConvLayer(cfg, i) for i in range(len(cfg.conv_dim))]

    def __call__(self, wav: mx.array) -> mx.array:
        x = wav[:, :, None]  # (B, N, 1)
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, T, 512)


class HubertFeatureProjection(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        if cfg.feat_proj_layer_norm:
            self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        if "layer_norm" in self:
            x = self.layer_norm(x)
        return self.projection(x)


class HubertPositionalConvEmbedding(nn.Module):
    """Grouped conv (k=128, pad 64) whose last output frame is dropped (even kernel), then GELU."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2,
                              groups=cfg.num_conv_pos_embedding_groups)
        self.num_pad_remove = 1 if k % 2 == 0 else 0

    def __call__(self, x: mx.array) -> mx.array:
        y = self.conv(x)
        if self.num_pad_remove:
            y = y[:, : -self.num_pad_remove]
        return nn.gelu(y)


class HubertAttention(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, d = x.shape

        def heads(y: mx.array) -> mx.array:  # (B, T, D) -> (B, H, T, Dh)
            return y.reshape(b, t, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, t, d))


class HubertFeedForward(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.output_dense(nn.gelu(self.intermediate_dense(x)))


class HubertEncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.attention = HubertAttention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = HubertFeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class HubertEncoder(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.pos_conv_embed = HubertPositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = [HubertEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        # post-norm variant: the encoder LayerNorm comes before the layers, none after
        x = self.layer_norm(x + self.pos_conv_embed(x))
        for layer in self.layers:
            x = layer(x)
        return x


class HubertModel(nn.Module):
    """HF `HubertModel` forward without masking or attention mask (batch of equal-length waveforms)."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.config = cfg
        self.feature_extractor = HubertFeatureEncoder(cfg)
        self.feature_projection = HubertFeatureProjection(cfg)
        self.encoder = HubertEncoder(cfg)

    def forward(self, wav: mx.array) -> mx.array:
        """(B, N) float32 waveform -> (B, T, hidden) last hidden state."""
        return self.encoder(self.feature_projection(self.feature_extractor(wav)))

    def __call__(self, wav16k: np.ndarray) -> np.ndarray:
        """Last hidden state `(768, T)` of a raw 16 kHz mono waveform, used exactly as given.

        `wav16k` is `(N,)` or `(1, N)` float; GPT-SoVITS appends 9600 zeros before calling this
        (see `dora_primespeech_mlx.audio`). T = floor((N - 400) / 320) + 1 frames at 50 Hz.
        """
        wav = np.asarray(wav16k, dtype=np.float32)
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise ValueError(f"hubert expects a mono waveform of shape (N,) or (1, N), got {wav.shape}")
        if wav.shape[0] < self.min_samples:
            raise ValueError(f"hubert needs at least {self.min_samples} samples (one frame), got {wav.shape[0]}")
        out = self.forward(mx.array(wav)[None])
        mx.eval(out)
        return np.array(out[0].T)

    @property
    def min_samples(self) -> int:
        """Receptive field of one output frame (400 samples for HuBERT-base)."""
        n = 1
        for k, s in zip(reversed(self.config.conv_kernel), reversed(self.config.conv_stride)):
            n = (n - 1) * s + k
        return n

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map HF HuBERT state-dict names/layouts to this module's parameters (pure, idempotent).

        Accepts `weight_g/weight_v` and `parametrizations.weight.original0/1` namings, an optional
        `hubert.` prefix (task-head saves), fuses the positional conv's weight norm over dim 2,
        transposes conv kernels from torch (O, I, K) to MLX (O, K, I), drops `masked_spec_embed`,
        and casts to float32.
        """
        cfg = self.config
        w = normalize_weight_norm_names(weights)
        out: dict[str, np.ndarray] = {}
        for key, value in w.items():
            if key.startswith("hubert."):
                key = key[len("hubert."):]
            if key == "masked_spec_embed":  # only used for training-time masking
                continue
            out[key] = np.asarray(value)
        pos = "encoder.pos_conv_embed.conv"
        if f"{pos}.weight_g" in out or f"{pos}.weight_v" in out:
            try:
                g, v = out.pop(f"{pos}.weight_g"), out.pop(f"{pos}.weight_v")
            except KeyError:
                raise CheckpointError(f"HuBERT weights: {pos} has only one of weight_g/weight_v; the file is damaged") from None
            # HuBERT normalises over every axis except the kernel axis (dim=2), unlike the usual dim=0
            out[f"{pos}.weight"] = fuse_weight_norm(g, v, dim=2)
        k = cfg.num_conv_pos_embeddings
        expected = {f"{pos}.weight": (cfg.hidden_size, k, cfg.hidden_size // cfg.num_conv_pos_embedding_groups)}
        for i, (c, kk) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel)):
            expected[f"feature_extractor.conv_layers.{i}.conv.weight"] = (c, kk, cfg.conv_dim[i - 1] if i else 1)
        for key, shape in expected.items():
            if key in out and out[key].shape != shape and out[key].transpose(0, 2, 1).shape == shape:
                out[key] = out[key].transpose(0, 2, 1)  # torch (O, I, K) -> MLX (O, K, I)
        return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in out.items()}


def load_hubert(folder: str | Path) -> HubertModel:
    """Load chinese-hubert-base from an HF folder (`model.safetensors` or `pytorch_model.bin`, no torch).

    Every model parameter must come from the file (strict load); fp32 compute.
    """
    folder = Path(folder)
    cfg = read_hf_config(folder, HubertConfig)
    model = HubertModel(cfg)
    weights = load_hf_weights_cached(folder)
    cfg.check_weights(weights, folder)
    weights = model.sanitize(weights)
    n_tensors = load_strict(model, weights, folder, what="HuBERT",
                            hint="use the chinese-hubert-base folder from the PrimeSpeech download")
    model.eval()
    logger.info("loaded HuBERT from %s (%d tensors)", folder, n_tensors)
    return model
