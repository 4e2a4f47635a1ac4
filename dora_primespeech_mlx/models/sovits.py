"""SoVITS v2 decoder stage (`module/models.py SynthesizerTrn`, inference parts), in MLX.

Semantic codes (25 Hz) + target phones + a reference spectrogram -> 32 kHz audio:

    ge     = ref_enc(spec[:704])                       style vector (512,)
    q      = codebook[codes], nearest-upsampled x2     50 Hz
    m, ls  = enc_p(q, phones, ge, speed)               text encoder with MRTE
    z      = flow^-1(m + noise * exp(ls) * noise_scale, ge)
    audio  = dec(z, ge)                                HiFi-GAN (models/hifigan.py)

Internally every tensor is channels-last `(B, T, C)` (MLX convolutions); the public API takes and
returns numpy arrays, channel-first and without batch, like upstream's tensors minus the batch axis.
The public API decodes one utterance at a time, so every sequence mask upstream applies is all ones
and is left out here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from ..weights import (
    CheckpointError,
    check_int,
    check_int_list,
    check_state_dict,
    check_weight_norm_pairs,
    fuse_weight_norm,
    normalize_weight_norm_names,
    plain_config,
    read_torch_file,
    short_repr,
    to_plain,
)
from .hifigan import Conv1d, Generator, frame_mask

logger = logging.getLogger(__name__)

__all__ = ["SoVITS", "SoVITSConfig", "frame_noise", "load_sovits", "save_sovits_safetensors", "spectrogram"]

# v2 symbol table size (text/symbols2.py); v1 has 322.
V2_SYMBOLS = 732
V1_SYMBOLS = 322
# metadata tag of the converted cache (`save_sovits_safetensors`); bump it if the layout changes
SAFETENSORS_FORMAT = "dora-primespeech-mlx/sovits-v1"


@dataclass
class SoVITSConfig:
    """Hyper-parameters of a SoVITS v2 checkpoint (`configs/s2.json`, stored in the `.pth`)."""

    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    resblock: str = "1"
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    upsample_rates: list[int] = field(default_factory=lambda: [10, 8, 2, 2, 2])
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16, 8, 2, 2])
    gin_channels: int = 512
    semantic_frame_rate: str = "25hz"
    version: str = "v2"
    # data section
    sampling_rate: int = 32000
    filter_length: int = 2048
    hop_length: int = 640
    win_length: int = 2048
    # fixed by the architecture, not stored in s2.json
    n_symbols: int = V2_SYMBOLS
    ssl_dim: int = 768
    codebook_size: int = 1024
    style_bins: int = 704  # v2 feeds only the first 704 spectrogram bins to ref_enc
    window_size: int = 4
    mrte_channels: int = 512
    mrte_heads: int = 4

    def __post_init__(self) -> None:
        self._check_ranges()
        self.spec_channels = self.filter_length // 2 + 1
        self.upsample_factor = int(np.prod(self.upsample_rates))

    def _check_ranges(self) -> None:
        """Sane ranges (the real v2 values are the defaults): a hostile config must not size anything."""
        w = "SoVITS config"
        for name, hi in (("inter_channels", 4096), ("hidden_channels", 4096), ("filter_channels", 16384),
                         ("gin_channels", 4096), ("ssl_dim", 4096), ("mrte_channels", 4096),
                         ("n_symbols", 65536), ("codebook_size", 65536)):
            check_int(w, name, getattr(self, name), 1, hi)
        check_int(w, "n_heads", self.n_heads, 1, 64)
        check_int(w, "mrte_heads", self.mrte_heads, 1, 64)
        check_int(w, "n_layers", self.n_layers, 1, 64)
        check_int(w, "kernel_size", self.kernel_size, 1, 31)
        check_int(w, "window_size", self.window_size, 1, 64)
        if self.hidden_channels % self.n_heads or self.mrte_channels % self.mrte_heads:
            raise ValueError(f"{w}: hidden_channels/mrte_channels must be multiples of n_heads/mrte_heads")
        if self.resblock not in ("1", "2"):
            raise ValueError(f"{w}: resblock={short_repr(self.resblock)} must be '1' or '2'")
        kernels = check_int_list(w, "resblock_kernel_sizes", self.resblock_kernel_sizes, 1, 63, max_len=8)
        dilations = self.resblock_dilation_sizes
        if not (isinstance(dilations, (list, tuple)) and len(dilations) == len(kernels)):
            raise ValueError(f"{w}: resblock_dilation_sizes needs one list per resblock kernel size")
        for d in dilations:
            check_int_list(w, "resblock_dilation_sizes[i]", d, 1, 64, max_len=8)
        rates = check_int_list(w, "upsample_rates", self.upsample_rates, 1, 64, max_len=8)
        check_int_list(w, "upsample_kernel_sizes", self.upsample_kernel_sizes, 1, 128, min_len=len(rates),
                       max_len=len(rates))
        check_int(w, "upsample_initial_channel", self.upsample_initial_channel, 2 ** len(rates), 8192)
        if self.semantic_frame_rate not in ("25hz", "50hz"):
            raise ValueError(f"{w}: semantic_frame_rate={short_repr(self.semantic_frame_rate)} must be '25hz' or '50hz'")
        if not isinstance(self.version, str):
            raise ValueError(f"{w}: version must be a string")
        check_int(w, "sampling_rate", self.sampling_rate, 1000, 192000)
        check_int(w, "filter_length", self.filter_length, 16, 16384)
        check_int(w, "hop_length", self.hop_length, 1, self.filter_length)
        check_int(w, "win_length", self.win_length, 1, self.filter_length)
        check_int(w, "style_bins", self.style_bins, 1, self.filter_length // 2 + 1)

    def check_weights(self, weights: dict[str, Any], source: str | Path) -> None:
        """Raise `CheckpointError` unless the tensors (raw `.pth` or sanitized cache names) have the sizes
        this config implies, and weight-norm pairs fit; runs before the model is built."""
        weights = check_state_dict(source, weights)
        check_weight_norm_pairs(source, {k: v for k, v in weights.items() if not k.startswith("enc_q.")}, dim=0)
        h, n_up, uic = self.hidden_channels, len(self.upsample_rates), self.upsample_initial_channel
        want: dict[tuple[str, ...], tuple[int, ...]] = {
            ("enc_p.text_embedding.weight",): (self.n_symbols, h),
            ("enc_p.ssl_proj.bias",): (h,),
            ("enc_p.proj.bias",): (2 * self.inter_channels,),
            (f"enc_p.encoder_text.attn_layers.{self.n_layers - 1}.conv_q.bias",): (h,),
            ("enc_p.encoder_text.ffn_layers.0.conv_1.bias",): (self.filter_channels,),
            ("enc_p.mrte.c_pre.bias",): (self.mrte_channels,),
            ("dec.conv_pre.bias",): (uic,),
            (f"dec.ups.{n_up - 1}.bias",): (uic // 2 ** n_up,),
            ("ssl_proj.bias",): (self.ssl_dim,),
            ("ref_enc.spectral.0.fc.weight",): (128, self.style_bins),
            ("ref_enc.fc.fc.bias",): (self.gin_channels,),
            ("quantizer.vq.layers.0._codebook.embed", "quantizer.embed"): (self.codebook_size, self.ssl_dim),
        }
        for keys, shape in want.items():
            got = next((weights[k] for k in keys if k in weights), None)
            if got is None or tuple(got.shape) != shape:
                found = "missing" if got is None else f"of shape {tuple(got.shape)}"
                raise CheckpointError(f"{source}: the SoVITS config implies {keys[0]} of shape {shape}, the file's "
                                      f"is {found}; the config does not match the weights (or the file is damaged)")
        for prefix in (f"enc_p.encoder_text.attn_layers.{self.n_layers}.", f"dec.ups.{n_up}."):
            if any(k.startswith(prefix) for k in weights):
                raise CheckpointError(f"{source}: the file holds {prefix}* beyond what the config describes; "
                                      "the config does not match the weights")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SoVITSConfig:
        """Build from the checkpoint's `config` (sections `data`/`model`) or a flat dict; unknown keys are ignored."""
        config = to_plain(config)
        if not isinstance(config, dict):
            raise ValueError(f"SoVITS config: expected a mapping, found {type(config).__name__}")
        flat: dict[str, Any] = {}
        for section in ("data", "model"):
            if isinstance(config.get(section), dict):
                flat.update(config[section])
        flat.update({k: v for k, v in config.items() if not isinstance(v, dict)})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names and v is not None})


# ----------------------------------------------------------------------------------- building blocks


class LayerNorm(nn.Module):
    """LayerNorm over channels with upstream's parameter names `gamma`/`beta`, eps 1e-5."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = mx.ones((channels,))
        self.beta = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.gamma, self.beta, self.eps)


class MultiHeadAttention(nn.Module):
    """VITS attention (`attentions.MultiHeadAttention`): 1x1 convs, optional relative positions.

    With `window_size`, keys and values get learned offsets for |i - j| <= window (one table shared
    by all heads); further offsets contribute nothing, as upstream's zero-padded tables do.
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, window_size: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        if window_size is not None:
            self.emb_rel_k = mx.zeros((1, 2 * window_size + 1, self.k_channels))
            self.emb_rel_v = mx.zeros((1, 2 * window_size + 1, self.k_channels))

    def _heads(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.k_channels).transpose(0, 2, 1, 3)  # (B, H, T, D)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        """Queries from `x` (B, Tq, C), keys/values from `c` (B, Tk, C) -> (B, Tq, C_out)."""
        b, t_q, _ = x.shape
        q = self._heads(self.conv_q(x)) / math.sqrt(self.k_channels)
        k = self._heads(self.conv_k(c))
        v = self._heads(self.conv_v(c))
        scores = q @ k.transpose(0, 1, 3, 2)  # (B, H, Tq, Tk)
        if self.window_size is not None:
            w = self.window_size
            pos = mx.arange(t_q)
            offset = pos[None, :] - pos[:, None]  # j - i, (T, T)
            in_window = (mx.abs(offset) <= w).astype(scores.dtype)
            rel_logits = q @ self.emb_rel_k[0].T  # (B, H, T, 2w+1): q_i . e_r
            idx = mx.broadcast_to(mx.clip(offset + w, 0, 2 * w), scores.shape)
            scores = scores + mx.take_along_axis(rel_logits, idx, axis=-1) * in_window
        p = mx.softmax(scores, axis=-1)
        out = p @ v
        if self.window_size is not None:
            # weight of each relative offset r for query i: p[i, i + r - w] (0 outside the sequence)
            cols = pos[:, None] + mx.arange(2 * w + 1)[None, :] - w  # (T, 2w+1)
            inside = ((cols >= 0) & (cols < t_q)).astype(p.dtype)
            cidx = mx.broadcast_to(mx.clip(cols, 0, t_q - 1), (*p.shape[:3], 2 * w + 1))
            rel_w = mx.take_along_axis(p, cidx, axis=-1) * inside
            out = out + rel_w @ self.emb_rel_v[0]
        out = out.transpose(0, 2, 1, 3).reshape(b, t_q, -1)
        return self.conv_o(out)


class FFN(nn.Module):
    """Conv(k) -> ReLU -> Conv(k), 'same' padding."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        # upstream pads (k-1)//2 left and k//2 right; equal for the odd kernel (3) of v2
        assert kernel_size % 2 == 1
        pad = (kernel_size - 1) // 2
        self.conv_1 = Conv1d(channels, filter_channels, kernel_size, padding=pad)
        self.conv_2 = Conv1d(filter_channels, channels, kernel_size, padding=pad)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv_2(nn.relu(self.conv_1(x)))


class Encoder(nn.Module):
    """Post-norm relative-position transformer (`attentions.Encoder`)."""

    def __init__(self, channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int, window_size: int):
        super().__init__()
        self.attn_layers = [MultiHeadAttention(channels, channels, n_heads, window_size) for _ in range(n_layers)]
        self.norm_layers_1 = [LayerNorm(channels) for _ in range(n_layers)]
        self.ffn_layers = [FFN(channels, filter_channels, kernel_size) for _ in range(n_layers)]
        self.norm_layers_2 = [LayerNorm(channels) for _ in range(n_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = n1(x + attn(x, x))
            x = n2(x + ffn(x))
        return x


class MRTE(nn.Module):
    """Multi-reference timbre encoder: SSL frames attend to the phones, plus the style vector."""

    def __init__(self, channels: int = 192, hidden: int = 512, n_heads: int = 4):
        super().__init__()
        self.cross_attention = MultiHeadAttention(hidden, hidden, n_heads)
        self.c_pre = nn.Conv1d(channels, hidden, 1)
        self.text_pre = nn.Conv1d(channels, hidden, 1)
        self.c_post = nn.Conv1d(hidden, channels, 1)

    def __call__(self, ssl: mx.array, text: mx.array, ge: mx.array) -> mx.array:
        ssl = self.c_pre(ssl)
        x = self.cross_attention(ssl, self.text_pre(text)) + ssl + ge
        return self.c_post(x)


def interpolate_linear(x: mx.array, size: int, scale: float | None = None, start: int = 0) -> mx.array:
    """`F.interpolate(mode="linear", align_corners=False)` along time of `(B, T, C)`.

    Returns output frames `start .. start + size - 1`. The source position of output frame j is
    `(j + 0.5) * scale - 0.5`, clamped to the input; `scale` defaults to torch's `T_in / size`
    (then `start` must be 0). The streaming decoder passes a fixed `scale` so that windows of one
    utterance share one time grid.
    """
    t_in = x.shape[1]
    # torch computes the source positions in float32 with scale = in / out
    scale32 = np.float32(t_in) / np.float32(size) if scale is None else np.float32(scale)
    src = (np.arange(start, start + size, dtype=np.float32) + np.float32(0.5)) * scale32 - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), t_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    lam = np.minimum(lam, np.float32(1.0))
    i1 = np.minimum(i0 + 1, t_in - 1)
    lam_mx = mx.array(lam)[None, :, None]
    return x[:, mx.array(i0)] * (1.0 - lam_mx) + x[:, mx.array(i1)] * lam_mx


class TextEncoder(nn.Module):
    """`enc_p`: SSL encoder, text encoder, MRTE, second encoder, projection to (m_p, logs_p)."""

    def __init__(self, cfg: SoVITSConfig):
        super().__init__()
        h, f, nh, k, w = cfg.hidden_channels, cfg.filter_channels, cfg.n_heads, cfg.kernel_size, cfg.window_size
        self.out_channels = cfg.inter_channels
        self.ssl_proj = nn.Conv1d(cfg.ssl_dim, h, 1)
        self.encoder_ssl = Encoder(h, f, nh, cfg.n_layers // 2, k, w)
        self.encoder_text = Encoder(h, f, nh, cfg.n_layers, k, w)
        self.text_embedding = nn.Embedding(cfg.n_symbols, h)
        self.mrte = MRTE(h, cfg.mrte_channels, cfg.mrte_heads)
        self.encoder2 = Encoder(h, f, nh, cfg.n_layers // 2, k, w)
        self.proj = nn.Conv1d(h, cfg.inter_channels * 2, 1)

    def encode_text(self, text: mx.array) -> mx.array:
        """Phone ids (B, S) -> encoded phones (B, S, C); depends on nothing else, so streaming caches it."""
        return self.encoder_text(self.text_embedding(text))

    def hidden(self, y: mx.array, t: mx.array, ge: mx.array) -> mx.array:
        """Upsampled codebook vectors (B, T, 768) + encoded phones -> hidden frames (B, T, C), before speed."""
        y = self.encoder_ssl(self.ssl_proj(y))
        return self.encoder2(self.mrte(y, t, ge))

    def project(self, y: mx.array) -> tuple[mx.array, mx.array]:
        """Hidden frames -> (m_p, logs_p), each (B, T, inter_channels)."""
        stats = self.proj(y)
        return stats[..., : self.out_channels], stats[..., self.out_channels :]

    def __call__(self, y: mx.array, text: mx.array, ge: mx.array, speed: float = 1.0) -> tuple[mx.array, mx.array]:
        """`y` (B, T, 768) upsampled codebook vectors, `text` (B, S) ids, `ge` (B, 1, 512)."""
        y = self.hidden(y, self.encode_text(text), ge)
        if speed != 1:
            # upstream: int(T / speed) + 1 frames, linear, and the (all-ones) mask by nearest
            y = interpolate_linear(y, int(y.shape[1] / speed) + 1)
        return self.project(y)


class WN(nn.Module):
    """WaveNet-style gated residual stack conditioned on `g` (`modules.WN`)."""

    def __init__(self, hidden: int, kernel_size: int, n_layers: int, gin_channels: int):
        super().__init__()
        self.hidden = hidden
        self.cond_layer = nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1)
        self.in_layers = [Conv1d(hidden, 2 * hidden, kernel_size, padding=(kernel_size - 1) // 2) for _ in range(n_layers)]
        self.res_skip_layers = [
            nn.Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
        ]

    def __call__(self, x: mx.array, g: mx.array, mask: mx.array | None = None) -> mx.array:
        """`mask` (1, T, 1), 1 on real frames of a zero-padded input: the kernel-5 convolutions see
        zeros past them, as upstream's `x_mask` gives, so real frames do not see the padding."""
        h = self.hidden
        g = self.cond_layer(g)  # (B, 1, 2*h*L)
        out = None
        n = len(self.in_layers)
        for i, (layer_in, layer_rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            # the conditioning is added before the gate split: tanh(a + g), sigmoid(b + g')
            a = layer_in(x if mask is None else x * mask) + g[..., 2 * h * i : 2 * h * (i + 1)]
            acts = mx.tanh(a[..., :h]) * mx.sigmoid(a[..., h:])
            rs = layer_rs(acts)
            if i < n - 1:
                x = x + rs[..., :h]
                skip = rs[..., h:]
            else:
                skip = rs
            out = skip if out is None else out + skip
        return out


class ResidualCouplingLayer(nn.Module):
    """Mean-only affine coupling: x1 <- x1 - post(WN(pre(x0))) when run in reverse."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, n_layers: int, gin_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel_size, n_layers, gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: mx.array, g: mx.array, mask: mx.array | None = None) -> mx.array:
        x0, x1 = x[..., : self.half], x[..., self.half :]
        m = self.post(self.enc(self.pre(x0), g, mask))
        return mx.concatenate([x0, x1 - m], axis=-1)


class Flip(nn.Module):
    """Reverse the channel order (no parameters; keeps the flow indices of the checkpoint)."""

    def reverse(self, x: mx.array, g: mx.array, mask: mx.array | None = None) -> mx.array:
        return x[..., ::-1]


class ResidualCouplingBlock(nn.Module):
    """`flow`: [coupling, flip] x 4; inference runs it backwards."""

    def __init__(self, channels: int, hidden: int, kernel_size: int = 5, n_layers: int = 4, n_flows: int = 4, gin_channels: int = 512):
        super().__init__()
        self.flows = []
        for _ in range(n_flows):
            self.flows.append(ResidualCouplingLayer(channels, hidden, kernel_size, n_layers, gin_channels))
            self.flows.append(Flip())

    def reverse(self, x: mx.array, g: mx.array, mask: mx.array | None = None) -> mx.array:
        for flow in reversed(self.flows):
            x = flow.reverse(x, g, mask)
        return x


class LinearNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc(x)


class Mish(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return nn.mish(x)


class ConvNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, kernel_size: int):
        super().__init__()
        self.conv = Conv1d(d_in, d_out, kernel_size, padding=(kernel_size - 1) // 2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class Conv1dGLU(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.channels = channels
        self.conv1 = ConvNorm(channels, 2 * channels, kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.conv1(x)
        return x + y[..., : self.channels] * mx.sigmoid(y[..., self.channels :])


class StyleAttention(nn.Module):
    """`modules.MultiHeadAttention` of MelStyleEncoder, with its residual add."""

    def __init__(self, n_head: int, d_model: int):
        super().__init__()
        self.n_head = n_head
        self.d_model = d_model
        self.w_qs = nn.Linear(d_model, d_model)
        self.w_ks = nn.Linear(d_model, d_model)
        self.w_vs = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, d_model)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        d_k = self.d_model // self.n_head

        def heads(y: mx.array) -> mx.array:
            return y.reshape(b, t, self.n_head, d_k).transpose(0, 2, 1, 3)

        q, k, v = heads(self.w_qs(x)), heads(self.w_ks(x)), heads(self.w_vs(x))
        # upstream's temperature is sqrt(d_model) = sqrt(128), not sqrt(d_k)
        attn = mx.softmax((q @ k.transpose(0, 1, 3, 2)) / math.sqrt(self.d_model), axis=-1)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, self.d_model)
        return self.fc(out) + x


class MelStyleEncoder(nn.Module):
    """`ref_enc`: linear spectrogram (first 704 bins) -> style vector `ge` (B, 1, 512)."""

    def __init__(self, in_dim: int = 704, hidden: int = 128, out_dim: int = 512, kernel_size: int = 5, n_head: int = 2):
        super().__init__()
        # indices 1, 2, 4, 5 are Mish/Dropout in upstream's nn.Sequential; keep 0 and 3 at their keys
        self.spectral = [LinearNorm(in_dim, hidden), Mish(), Mish(), LinearNorm(hidden, hidden)]
        self.temporal = [Conv1dGLU(hidden, kernel_size), Conv1dGLU(hidden, kernel_size)]
        self.slf_attn = StyleAttention(n_head, hidden)
        self.fc = LinearNorm(hidden, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.mish(self.spectral[0](x))
        x = nn.mish(self.spectral[3](x))
        for block in self.temporal:
            x = block(x)
        x = self.fc(self.slf_attn(x))
        return mx.mean(x, axis=1, keepdims=True)


class Quantizer(nn.Module):
    """The single 1024 x 768 codebook (`quantizer.vq.layers.0._codebook.embed`)."""

    def __init__(self, codebook_size: int = 1024, dim: int = 768):
        super().__init__()
        self.embed = mx.zeros((codebook_size, dim))

    def encode(self, x: mx.array) -> mx.array:
        """Nearest code by Euclidean distance, in upstream's expanded form. `x` (B, T, D) -> (B, T)."""
        e = self.embed
        dist = -(mx.sum(x * x, axis=-1, keepdims=True) - 2 * (x @ e.T) + mx.sum(e * e, axis=-1)[None, None])
        return mx.argmax(dist, axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embed[codes]


# ------------------------------------------------------------------------------------------- model


def spectrogram(wav: np.ndarray, filter_length: int = 2048, hop_length: int = 640, win_length: int = 2048) -> np.ndarray:
    """Linear magnitude spectrogram as dora-primespeech computes it: `(filter_length//2+1, F)` float32.

    Reflect padding of (n_fft - hop)/2 on both sides, STFT without centering, periodic Hann window,
    magnitude `sqrt(re^2 + im^2 + 1e-6)`. Computed in float64 (torch works in float32; the
    float64 result is the closer of the two to the exact value).
    """
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    pad = (filter_length - hop_length) // 2
    if wav.size <= pad:
        raise ValueError(f"waveform of {wav.size} samples is too short for a spectrogram (needs more than {pad})")
    y = np.pad(wav, (pad, pad), mode="reflect")
    n_frames = 1 + (y.size - filter_length) // hop_length
    window = np.zeros(filter_length)
    n = np.arange(win_length)
    off = (filter_length - win_length) // 2
    window[off : off + win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    frames = np.lib.stride_tricks.sliding_window_view(y, filter_length)[::hop_length][:n_frames]
    spec = np.fft.rfft(frames * window, axis=-1)  # (F, n_fft//2+1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-6)
    return mag.T.astype(np.float32)


def frame_noise(rng: np.random.Generator, n_frames: int, channels: int) -> np.ndarray:
    """Standard-normal noise `(n_frames, channels)` float32, frame-major.

    Drawn frame by frame from one numpy generator, so drawing 300 frames at once or in pieces gives
    the same rows: the streaming decoder and the whole-utterance decode see the same noise.
    """
    return rng.standard_normal((n_frames, channels), dtype=np.float32)


class SoVITS(nn.Module):
    """SynthesizerTrn (v2) minus the training-only posterior encoder and discriminator.

    `compile_vocoder=True` runs HiFi-GAN through `mx.compile` (one compiled graph per input length;
    same results bit for bit; see benchmarks/bench_sovits.py for when it pays). Off by default.
    """

    def __init__(self, config: SoVITSConfig, *, compile_vocoder: bool = False):
        super().__init__()
        self.config = config
        cfg = config
        if cfg.semantic_frame_rate not in ("25hz", "50hz"):
            raise ValueError(f"semantic_frame_rate must be '25hz' or '50hz', got {cfg.semantic_frame_rate!r}")
        self.ssl_proj = nn.Conv1d(cfg.ssl_dim, cfg.ssl_dim, 2 if cfg.semantic_frame_rate == "25hz" else 1,
                                  stride=2 if cfg.semantic_frame_rate == "25hz" else 1)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.ssl_dim)
        self.enc_p = TextEncoder(cfg)
        self.flow = ResidualCouplingBlock(cfg.inter_channels, cfg.hidden_channels, 5, 4, 4, cfg.gin_channels)
        self.dec = Generator(cfg.inter_channels, cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes,
                             cfg.upsample_rates, cfg.upsample_initial_channel, cfg.upsample_kernel_sizes,
                             gin_channels=cfg.gin_channels)
        self.ref_enc = MelStyleEncoder(cfg.style_bins, 128, cfg.gin_channels)
        # a plain attribute (not a parameter): the compiled graph closes over the loaded weights
        self._vocoder = mx.compile(self.dec) if compile_vocoder else self.dec
        # > 0: the flow and HiFi-GAN run on inputs zero-padded up to a multiple of this many frames,
        # masked so real frames are unchanged: on MLX's CUDA backend a convolution shape other than
        # the previous call's costs ~100 ms (`default_bucket_frames`). Set by `load_sovits`.
        self.bucket_frames = 0

    # ---------------------------------------------------------------- weights

    def sanitize(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checkpoint `weight` dict -> MLX parameters (float32). Pure and idempotent.

        Fuses weight norm (`g * v / ||v||`, norm over all axes but 0: per output channel of a
        Conv1d, per input channel of a ConvTranspose1d), drops `enc_q.*` and the quantizer's EMA
        state, renames the codebook to `quantizer.embed` (MLX skips `_`-prefixed attributes) and
        moves conv weights to MLX layout: Conv1d (out, in, k) -> (out, k, in), ConvTranspose1d
        (in, out, k) -> (out, k, in). A weight already in MLX layout is left as it is.
        """
        weights = normalize_weight_norm_names(dict(weights))
        expected = dict(tree_flatten(self.parameters()))
        out: dict[str, np.ndarray] = {}
        for key, value in weights.items():
            if key.startswith("enc_q.") or key.endswith(("weight_g", "._codebook.inited", "._codebook.cluster_size",
                                                         "._codebook.embed_avg")):
                continue
            value = np.asarray(value)
            if key.endswith("weight_v"):
                base = key[: -len("_v")]
                value = fuse_weight_norm(weights[base + "_g"], value, dim=0)
                key = base
            if key.endswith("._codebook.embed"):
                key = "quantizer.embed"
            value = value.astype(np.float32)
            want = expected.get(key)
            if want is not None and value.ndim == 3 and tuple(value.shape) != tuple(want.shape):
                # torch ConvTranspose1d stores (in, out, k); Conv1d stores (out, in, k)
                value = value.transpose(1, 2, 0) if key.startswith("dec.ups.") else value.transpose(0, 2, 1)
            out[key] = np.ascontiguousarray(value)
        return out

    def load_weights_from(self, weights: dict[str, np.ndarray], source: str = "weights") -> None:
        """Sanitize and load strictly: every parameter must come from `weights`, with its shape."""
        clean = self.sanitize(weights)
        expected = dict(tree_flatten(self.parameters()))
        missing = sorted(set(expected) - set(clean))
        unexpected = sorted(set(clean) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: SoVITS weights do not match the v2 architecture; missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}). Use a GPT-SoVITS v2 SoVITS .pth."
            )
        bad = [k for k in expected if tuple(expected[k].shape) != tuple(clean[k].shape)]
        if bad:
            k = bad[0]
            raise CheckpointError(
                f"{source}: {len(bad)} SoVITS tensors have unexpected shapes, e.g. {k}: "
                f"{tuple(clean[k].shape)} vs {tuple(expected[k].shape)}; the config does not match the weights"
            )
        self.load_weights([(k, mx.array(v)) for k, v in clean.items()], strict=True)
        mx.eval(self.parameters())

    # ---------------------------------------------------------------- public API (numpy)

    def spectrogram(self, wav32k: np.ndarray) -> np.ndarray:
        """32 kHz mono waveform (samples,) -> linear spectrogram (1025, F) float32."""
        c = self.config
        return spectrogram(wav32k, c.filter_length, c.hop_length, c.win_length)

    def extract_latent(self, hubert_features: np.ndarray) -> np.ndarray:
        """CNHubert last hidden state (768, T) at 50 Hz -> prompt codes (T//2,) int64 at 25 Hz."""
        feats = np.asarray(hubert_features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != self.config.ssl_dim:
            raise ValueError(f"hubert_features must be ({self.config.ssl_dim}, T), got {feats.shape}")
        x = self.ssl_proj(mx.array(feats.T)[None])  # (1, T//2, 768)
        codes = self.quantizer.encode(x)[0]
        return np.array(codes).astype(np.int64)

    def style_vector(self, refer_spec: np.ndarray) -> np.ndarray:
        """Reference spectrogram (1025, F) -> style vector `ge` (512,). Compute once per voice."""
        spec = np.asarray(refer_spec, dtype=np.float32)
        if spec.ndim != 2 or spec.shape[0] < self.config.style_bins:
            raise ValueError(f"refer_spec must be ({self.config.spec_channels}, F), got {spec.shape}")
        ge = self.ref_enc(mx.array(spec[: self.config.style_bins].T)[None])
        return np.array(ge[0, 0])

    def latent(
        self,
        codes: np.ndarray,
        phone_ids: np.ndarray,
        refer_spec: np.ndarray | None = None,
        *,
        ge: np.ndarray | None = None,
        speed: float = 1.0,
        noise_scale: float = 0.5,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Everything before the vocoder: `m_p`, `logs_p`, `z` (192, T') and `ge` (512,), numpy."""
        ge_mx = self._ge(refer_spec, ge)
        m_p, logs_p, z = self._latent(codes, phone_ids, ge_mx, speed, noise_scale, noise, seed)
        return {"m_p": np.array(m_p[0].T), "logs_p": np.array(logs_p[0].T), "z": np.array(z[0].T),
                "ge": np.array(ge_mx[0, 0])}

    def decode(
        self,
        codes: np.ndarray,
        phone_ids: np.ndarray,
        refer_spec: np.ndarray | None = None,
        *,
        ge: np.ndarray | None = None,
        speed: float = 1.0,
        noise_scale: float = 0.5,
        noise: np.ndarray | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Semantic codes (N,) + target phone ids (S,) + reference -> 32 kHz audio (640 * T',) float32.

        The reference is either `refer_spec` (1025, F) or a precomputed style vector `ge` (512,)
        from `style_vector`. `T' = 2N` at speed 1, else `int(2N / speed) + 1` (upstream's rule).
        `noise` (192, T') injects the standard-normal draw (for parity with a recorded run);
        otherwise it is drawn frame by frame from `numpy.random.default_rng(seed)` (`frame_noise`).
        """
        ge_mx = self._ge(refer_spec, ge)
        _, _, z = self._latent(codes, phone_ids, ge_mx, speed, noise_scale, noise, seed)
        audio = self.vocode(z, ge_mx)
        return np.array(audio[0, :, 0], dtype=np.float32)

    def stream_decoder(self, phone_ids: np.ndarray, refer_spec: np.ndarray | None = None, **kwargs: Any):
        """A `SoVITSStreamDecoder` for one utterance: feed codes as the GPT makes them, get audio.

        Arguments as `decode` (without the codes) plus the window settings of the stream decoder.
        """
        from .sovits_stream import SoVITSStreamDecoder

        return SoVITSStreamDecoder(self, phone_ids, refer_spec, **kwargs)

    def vocode(self, z: mx.array, ge: mx.array) -> mx.array:
        """HiFi-GAN: latent (1, T', 192) + style (1, 1, 512) -> audio (1, 640 * T', 1), lazily."""
        return self._in_bucket(self._vocoder, z, ge, self.config.upsample_factor)

    def flow_reverse(self, z_p: mx.array, ge: mx.array) -> mx.array:
        """The reverse flow over (1, T', 192), in a shape bucket when `bucket_frames` is set."""
        return self._in_bucket(self.flow.reverse, z_p, ge, 1)

    def _in_bucket(self, fn, x: mx.array, ge: mx.array, out_per_frame: int) -> mx.array:
        """`fn(x, ge[, mask])` on `x` (1, T, C) zero-padded to its bucket and masked past T; the output
        is cut back to the `out_per_frame * T` steps of the real frames."""
        t = x.shape[1]
        padded = self._bucket(t)
        if padded == t:
            return fn(x, ge)
        x = mx.pad(x, [(0, 0), (0, padded - t), (0, 0)])
        return fn(x, ge, frame_mask(padded, t))[:, : t * out_per_frame]

    def warm_up_buckets(self, max_frames: int = 256, *, last: int | None = None) -> float:
        """Run the flow and HiFi-GAN once per bucket shape up to `max_frames` (through the masked path
        real inputs take), so no request pays a shape's first-use costs; the bucket of `last` frames
        runs last (on CUDA the shape of the previous call is the cheap one to repeat). No-op without
        buckets. Seconds."""
        t0 = time.perf_counter()
        b = self.bucket_frames
        if b > 0:
            ge = mx.zeros((1, 1, self.config.gin_channels))
            shapes = list(range(b, self._bucket(max(1, max_frames)) + 1, b))
            if last is not None:
                final = self._bucket(max(1, last))
                shapes = [f for f in shapes if f != final] + [final]
            for frames in shapes:
                z = mx.zeros((1, frames - 1, self.config.inter_channels))
                mx.eval(self.flow_reverse(z, ge), self.vocode(z, ge))
        return time.perf_counter() - t0

    def _bucket(self, frames: int) -> int:
        b = self.bucket_frames
        return frames if b <= 0 else -(-frames // b) * b

    # ---------------------------------------------------------------- internals (MLX, channels-last)

    def _ge(self, refer_spec: np.ndarray | None, ge: np.ndarray | None) -> mx.array:
        if ge is not None:
            g = np.asarray(ge, dtype=np.float32).reshape(-1)
            if g.size != self.config.gin_channels:
                raise ValueError(f"ge must have {self.config.gin_channels} values, got {g.size}")
            return mx.array(g)[None, None]
        if refer_spec is None:
            raise ValueError("decode needs refer_spec (1025, F) or a style vector ge (512,)")
        return mx.array(self.style_vector(refer_spec))[None, None]

    def _check_codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes).reshape(-1)
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return codes

    def _check_phones(self, phone_ids, speed: float) -> np.ndarray:
        phones = np.asarray(phone_ids).reshape(-1)
        if phones.size == 0:
            raise ValueError("decode needs at least one phone id")
        if phones.min() < 0 or phones.max() >= self.config.n_symbols:
            raise ValueError(f"phone ids must lie in [0, {self.config.n_symbols}), got [{phones.min()}, {phones.max()}]")
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        return phones

    def _frames(self, codes: np.ndarray) -> mx.array:
        """Codes (N,) -> codebook vectors at 50 Hz (1, T, 768)."""
        q = self.quantizer.decode(mx.array(codes.astype(np.int32)))[None]  # (1, N, 768)
        if self.config.semantic_frame_rate == "25hz":
            q = mx.repeat(q, 2, axis=1)  # nearest x2 -> 50 Hz
        return q

    def _latent(self, codes, phone_ids, ge: mx.array, speed: float, noise_scale: float, noise, seed):
        codes = self._check_codes(codes)
        phones = self._check_phones(phone_ids, speed)
        if codes.size == 0:
            raise ValueError("decode needs at least one code (upstream decodes [0] when the GPT stops at once)")
        m_p, logs_p = self.enc_p(self._frames(codes), mx.array(phones.astype(np.int32))[None], ge, speed)
        if noise is not None:
            eps = np.asarray(noise, dtype=np.float32)
            if eps.shape != (m_p.shape[2], m_p.shape[1]):
                raise ValueError(f"noise must have shape {(m_p.shape[2], m_p.shape[1])}, got {eps.shape}")
            eps = mx.array(eps.T)[None]
        elif noise_scale != 0:
            # numpy, frame-major: the stream decoder draws the same rows window by window
            eps = mx.array(frame_noise(np.random.default_rng(seed), m_p.shape[1], m_p.shape[2]))[None]
        else:
            eps = None
        z_p = m_p if eps is None else m_p + eps * mx.exp(logs_p) * noise_scale
        z = self.flow_reverse(z_p, ge)
        return m_p, logs_p, z


# -------------------------------------------------------------------------------------------- loading


def check_version(path: str | Path, version_tag: str | None, config: dict, weights: dict) -> None:
    """Raise if the file is not a GPT-SoVITS v2 SoVITS checkpoint (v1, v2Pro/ProPlus, v3, v4)."""
    found = None
    if version_tag is not None and version_tag != "v2":
        found = version_tag
    else:
        emb = weights.get("enc_p.text_embedding.weight")
        section = config.get("model") if isinstance(config, dict) else None
        model_version = section.get("version") if isinstance(section, dict) else None
        if emb is not None and emb.shape[0] == V1_SYMBOLS:
            found = "v1 (322-symbol text embedding)"
        elif any(k.startswith(("sv_emb.", "ge_to512.", "prelu.")) for k in weights):
            found = "v2Pro (speaker-verification embedding layers present)"
        elif model_version not in (None, "v2"):
            found = short_repr(model_version)
    if found is not None:
        raise CheckpointError(
            f"{path}: unsupported version {found}: this engine runs GPT-SoVITS v2 SoVITS weights only. "
            "Use the v2 SoVITS_weights file of the voice (dora-primespeech's models are v2)."
        )


def _read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, sanitized weights) from a `.safetensors` cache written by `save_sovits_safetensors`."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for a damaged file
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); delete it and convert the SoVITS .pth again"
        ) from None
    if metadata.get("format") != SAFETENSORS_FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path}: not a SoVITS cache written by save_sovits_safetensors (metadata format "
            f"{metadata.get('format')!r}, expected {SAFETENSORS_FORMAT!r}); load the voice's SoVITS .pth instead"
        )
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the SoVITS cache's config metadata is not JSON ({exc})") from None
    return config, {k: np.array(v) for k, v in arrays.items()}


def default_bucket_frames() -> int:
    """Shape bucket of the flow and vocoder for the current device: 160 frames (3.2 s) on a CUDA GPU,
    none on Metal and the CPU, which have no per-shape set-up, so padding would only add work.

    Why 160 on CUDA (benchmarks/bench_stream_windows.py, H100): a convolution shape other than the
    previous call's costs ~100-150 ms of set-up there, however often it was seen before (a larger
    MLX_CUDA_CONV_CACHE_SIZE or MLX_CUDA_GRAPH_CACHE_SIZE did not help). With 32- or 64-frame
    buckets a stream's windows alternate between two shapes and each costs ~170 ms; with one
    bucket that holds every window (first window 50 frames, later ones <= 2 x 50 codes + overlap 16
    + context 12 + flow context 32 = 160) each costs ~22 ms, and whole sentences up to 3.2 s share
    that shape too.
    """
    if mx.default_device().type != mx.DeviceType.gpu or mx.metal.is_available():
        return 0
    return 160


def load_sovits(path: str | Path, *, compile_vocoder: bool = False, bucket_frames: int | None = None) -> SoVITS:
    """Read a GPT-SoVITS v2 SoVITS `.pth` (torch-free) or its `.safetensors` cache; return the MLX model.

    The config comes from the file. Loading is strict: a missing, unexpected or mis-shaped tensor
    raises `CheckpointError` naming the file, and so does a non-v2 checkpoint or a foreign cache.
    `bucket_frames` (None: `default_bucket_frames()`) sets `SoVITS.bucket_frames`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SoVITS weights not found: {path} (pass SoVITS_weights/<voice>.pth or its cache)")
    if path.suffix == ".safetensors":
        config, weights = _read_cache(path)
        version_tag = None
    else:
        ckpt = read_torch_file(path)
        obj = ckpt.obj
        if not isinstance(obj, dict) or "weight" not in obj or "config" not in obj:
            raise CheckpointError(
                f"{path}: expected a SoVITS checkpoint with 'weight' and 'config'; is this a GPT .ckpt?"
            )
        config, weights = plain_config(obj["config"], path), check_state_dict(path, obj["weight"])
        version_tag = ckpt.version_tag
    check_version(path, version_tag, config, weights)
    try:
        cfg = SoVITSConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad SoVITS config ({exc})") from None
    cfg.check_weights(weights, path)
    model = SoVITS(cfg, compile_vocoder=compile_vocoder)
    # a cache holds already-sanitized weights; sanitize() is idempotent, so both forms go through it
    model.load_weights_from(weights, source=str(path))
    model.bucket_frames = default_bucket_frames() if bucket_frames is None else max(0, int(bucket_frames))
    logger.info("loaded SoVITS %s (%d tensors)", path, len(weights))
    return model


def save_sovits_safetensors(model: SoVITS, path: str | Path) -> Path:
    """Write `model`'s sanitized parameters (float32) and config to a `.safetensors` cache.

    The weights are stored after weight-norm fusion and in MLX layout, in float32 so that loading
    the cache gives the very parameters of the model, bit for bit. `load_sovits` reads the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    metadata = {"format": SAFETENSORS_FORMAT, "config": json.dumps(asdict(model.config))}
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    return path
