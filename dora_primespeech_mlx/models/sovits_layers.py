"""Building blocks of the SoVITS v2 graph (`module/attentions.py`, `modules.py`, `mrte_model.py`,
`quantize`), channels-last `(B, T, C)`, plus the helpers the whole and the streaming decode share
(`interpolate_linear`, `frame_noise`). HiFi-GAN is in models/hifigan.py."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx import nn

from .hifigan import Conv1d
from .sovits_config import SoVITSConfig

__all__ = ["MelStyleEncoder", "Quantizer", "ResidualCouplingBlock", "TextEncoder", "frame_noise", "interpolate_linear"]


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
        self.conv_q = Conv1d(channels, channels, 1)
        self.conv_k = Conv1d(channels, channels, 1)
        self.conv_v = Conv1d(channels, channels, 1)
        self.conv_o = Conv1d(channels, out_channels, 1)
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
        # over frames, at a new length per sentence and per stream window: a matmul on a GPU
        self.conv_1 = Conv1d(channels, filter_channels, kernel_size, padding=pad, gpu_matmul=True)
        self.conv_2 = Conv1d(filter_channels, channels, kernel_size, padding=pad, gpu_matmul=True)

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
        self.c_pre = Conv1d(channels, hidden, 1)
        self.text_pre = Conv1d(channels, hidden, 1)
        self.c_post = Conv1d(hidden, channels, 1)

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
        self.ssl_proj = Conv1d(cfg.ssl_dim, h, 1)
        self.encoder_ssl = Encoder(h, f, nh, cfg.n_layers // 2, k, w)
        self.encoder_text = Encoder(h, f, nh, cfg.n_layers, k, w)
        self.text_embedding = nn.Embedding(cfg.n_symbols, h)
        self.mrte = MRTE(h, cfg.mrte_channels, cfg.mrte_heads)
        self.encoder2 = Encoder(h, f, nh, cfg.n_layers // 2, k, w)
        self.proj = Conv1d(h, cfg.inter_channels * 2, 1)

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
        self.cond_layer = Conv1d(gin_channels, 2 * hidden * n_layers, 1)
        self.in_layers = [Conv1d(hidden, 2 * hidden, kernel_size, padding=(kernel_size - 1) // 2) for _ in range(n_layers)]
        self.res_skip_layers = [
            Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1) for i in range(n_layers)
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
        self.pre = Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, kernel_size, n_layers, gin_channels)
        self.post = Conv1d(hidden, self.half, 1)

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


def frame_noise(rng: np.random.Generator, n_frames: int, channels: int) -> np.ndarray:
    """Standard-normal noise `(n_frames, channels)` float32, frame-major.

    Drawn frame by frame from one numpy generator, so drawing 300 frames at once or in pieces gives
    the same rows: the streaming decoder and the whole-utterance decode see the same noise.
    """
    return rng.standard_normal((n_frames, channels), dtype=np.float32)

