"""HiFi-GAN generator of SoVITS v2 (`SynthesizerTrn.dec`), in MLX.

Layout is channels-last throughout: `(B, T, C)`. Attribute names mirror the checkpoint keys
(`dec.conv_pre`, `dec.ups.i`, `dec.resblocks.j.convs1.k`, `dec.conv_post`, `dec.cond`), so the
weights map one to one after weight-norm fusion (done in `sovits.sanitize`).

Upsampling 10/8/2/2/2 turns one 50 Hz latent frame into 640 samples at 32 kHz.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

__all__ = ["Conv1d", "Generator", "ResBlock1", "frame_mask"]

LRELU_SLOPE = 0.1


def _on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


class Conv1d(nn.Conv1d):
    """`nn.Conv1d` (stride 1) that, on the CPU backend, runs as a sum of one matmul per kernel tap,
    and on a GPU runs kernel-size-1 convolutions (and, with `gpu_matmul`, any kernel size) as one
    matmul.

    Why: MLX's CPU convolution reaches ~1.2 GFLOP/s on these shapes, the per-tap matmuls ~5 GFLOP/s
    (same maths, another summation order). On a GPU a convolution over frames is a matrix product
    of the input's shifted copies (k x C_in wide), and a matmul skips the convolution library's
    per-shape plans: on CUDA each new convolution shape costs set-up, and SoVITS' text encoder sees
    a new length with every sentence and every stream window. Convolutions over samples (HiFi-GAN,
    up to 100k steps) keep the native convolution, whose shapes the engine buckets.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 dilation: int = 1, bias: bool = True, gpu_matmul: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=bias)
        self._pad = padding
        self._dil = dilation
        self._gpu_matmul = gpu_matmul

    def __call__(self, x: mx.array) -> mx.array:
        k = self.weight.shape[1]
        if not _on_cpu() and (k == 1 or self._gpu_matmul):
            return self._as_matmul(x)
        if k == 1 or not _on_cpu():
            return super().__call__(x)
        y = None
        for j, shifted in enumerate(self._taps(x)):
            tap = shifted @ self.weight[:, j, :].T
            y = tap if y is None else y + tap
        return y + self.bias if "bias" in self else y

    def _taps(self, x: mx.array) -> list[mx.array]:
        """The input each kernel tap sees: k shifted views of the padded input, each (B, T', C_in)."""
        k = self.weight.shape[1]
        if k == 1 and not self._pad:
            return [x]  # no slice op for the common 1x1 case
        t_out = x.shape[1] + 2 * self._pad - self._dil * (k - 1)
        xp = mx.pad(x, [(0, 0), (self._pad, self._pad), (0, 0)]) if self._pad else x
        return [xp[:, j * self._dil : j * self._dil + t_out] for j in range(k)]

    def _as_matmul(self, x: mx.array) -> mx.array:
        """One matmul: the k taps' inputs side by side (B, T', k * C_in) against the weight
        (C_out, k, C_in) read as (C_out, k * C_in)."""
        c_out, k, c_in = self.weight.shape
        taps = self._taps(x)
        cols = taps[0] if k == 1 else mx.concatenate(taps, axis=-1)
        w = self.weight.reshape(c_out, k * c_in).T
        return mx.addmm(self.bias, cols, w) if "bias" in self else cols @ w


def _masked(x: mx.array, mask: mx.array | None) -> mx.array:
    return x if mask is None else x * mask


def frame_mask(length: int, valid: int) -> mx.array:
    """(1, length, 1) float mask, 1 on the first `valid` positions."""
    return (mx.arange(length) < valid).astype(mx.float32)[None, :, None]


def _padding(kernel_size: int, dilation: int = 1) -> int:
    # "same" length for odd kernels
    return (kernel_size * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs with leaky-ReLU 0.1 and a residual add after each pair."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.convs1 = [
            Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size, d), dilation=d)
            for d in dilation
        ]
        self.convs2 = [
            Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size, 1)) for _ in dilation
        ]

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        """`mask` (1, T, 1), 1 on valid frames: zeroes every convolution's input past them (see
        `Generator.__call__`)."""
        for c1, c2 in zip(self.convs1, self.convs2):
            t = c1(_masked(nn.leaky_relu(x, LRELU_SLOPE), mask))
            t = c2(_masked(nn.leaky_relu(t, LRELU_SLOPE), mask))
            x = x + t
        return x


class Generator(nn.Module):
    """HiFi-GAN generator conditioned on the style vector `g` (through `cond`)."""

    def __init__(
        self,
        initial_channel: int,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        gin_channels: int = 0,
    ):
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = Conv1d(initial_channel, upsample_initial_channel, 7, padding=3)
        self.ups = []
        self.resblocks = []
        self._rates = tuple(int(u) for u in upsample_rates)
        ch = upsample_initial_channel
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            c_in, ch = upsample_initial_channel // (2**i), upsample_initial_channel // (2 ** (i + 1))
            # MLX's `padding` crops like torch's ConvTranspose1d padding (output (L-1)*u - 2p + k)
            self.ups.append(nn.ConvTranspose1d(c_in, ch, k, stride=u, padding=(k - u) // 2))
            for rk, rd in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(ch, rk, rd))
        self.conv_post = Conv1d(ch, 1, 7, padding=3, bias=False)
        if gin_channels:
            self.cond = Conv1d(gin_channels, upsample_initial_channel, 1)

    def __call__(self, x: mx.array, g: mx.array | None = None, valid: mx.array | None = None) -> mx.array:
        """`x` (B, T, 192) latent, `g` (B, 1, 512) style vector -> (B, 640*T, 1) audio in [-1, 1].

        `valid` (1, T, 1) marks real frames of a zero-padded `x` (a shape bucket). Every convolution
        input is zeroed past them, at every resolution, so the audio of the real frames is what the
        unpadded `x` gives (its convolutions zero-pad at the same place); only the summation order
        may differ. The audio of padded frames is meaningless.
        """
        mask = valid
        x = self.conv_pre(_masked(x, mask))
        if g is not None:
            x = x + self.cond(g)
        for i, up in enumerate(self.ups):
            x = up(_masked(nn.leaky_relu(x, LRELU_SLOPE), mask))
            if mask is not None:
                mask = mx.repeat(mask, self._rates[i], axis=1)  # ConvTranspose: T -> T * rate
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x, mask)
            for block in blocks[1:]:
                xs = xs + block(x, mask)
            x = xs * (1.0 / self.num_kernels)
        # upstream calls F.leaky_relu with its default slope 0.01 here, not 0.1
        x = self.conv_post(_masked(nn.leaky_relu(x, 0.01), mask))
        return mx.tanh(x)
