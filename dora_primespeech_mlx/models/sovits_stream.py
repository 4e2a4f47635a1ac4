"""Streaming SoVITS decode: audio from a growing sequence of semantic codes, window by window.

Each window re-runs the parts of the decoder that need it, over the context they need:

* `enc_p` (SSL encoder, MRTE, encoder2) attends over the whole code sequence, so a frame's latent
  depends on every code, including those the GPT has not made yet. Each window runs it on all codes
  so far (cheap: ~4 % of a decode on mlx-cpu); only the future is missing. Frames near the end of
  the codes so far are the least settled, so the last `overlap_frames` of a window are not emitted:
  the next window, which knows more codes, recomputes them.
* the flow (4 couplings x 4 WaveNet layers, kernel 5) sees +-32 frames and HiFi-GAN +-12 frames
  (`VOCODER_CONTEXT`). The flow runs over `FLOW_CONTEXT` frames more on the left and HiFi-GAN over
  `context_frames` more, whose audio is thrown away, so the start of a window's new audio is what a
  whole decode would give from the same latent.
* the first `crossfade_frames` of the held-back audio are kept and cross-faded (complementary Hann
  ramps, which sum to one, so equal signals pass unchanged) with the next window's version of them.

All windows share one time grid, one noise sequence (`frame_noise`, drawn frame by frame) and the
style vector, so the joined chunks have exactly the length of `SoVITS.decode` and differ from it
only where the missing future changed the latent (measured in tools/measure_sovits_chunks.py; the
chosen overlap and its bound are in tests/test_sovits.py). A stream that is finished before any
window ran decodes in one go and equals `SoVITS.decode` bit for bit (at speed 1).

At speed != 1 upstream resamples the latent to `int(T / speed) + 1` frames with a grid that depends
on the final `T`; a stream cannot know it, so windows use the fixed step `speed` and the final
length is upstream's. The two grids drift apart by at most one frame (20 ms) over an utterance.
"""

from __future__ import annotations

import logging
import math

import mlx.core as mx
import numpy as np

from .sovits import SoVITS
from .sovits_layers import frame_noise, interpolate_linear

logger = logging.getLogger(__name__)

__all__ = ["FIRST_CHUNK_CODES", "FIRST_CHUNK_CODES_CUDA", "FLOW_CONTEXT", "VOCODER_CONTEXT", "SoVITSStreamDecoder",
           "default_first_chunk_codes", "max_window_frames"]

# receptive field of the reverse flow on each side, in 50 Hz frames: 4 couplings x 4 WN layers x 2
FLOW_CONTEXT = 32
# HiFi-GAN's receptive field on each side in frames (conv_pre 3 + stage-0 resblocks 6 + the rest ~2)
VOCODER_CONTEXT = 12
# Chosen from tools/measure_sovits_chunks.py (fixture SoVITS, 60 codes, windows every 25 codes):
# streamed vs whole max |diff| / peak was 0.150 / 0.114 / 0.110 / 0.104 for overlap:crossfade
# 4:2 / 8:4 / 16:8 / 24:12, a floor set by enc_p's global attention (the latent of a 30-code prefix
# is 0.17 of peak off everywhere, 0.30 in its last 2 frames). What the windows themselves add is
# 2.5e-6 at 16:8 (whole-sequence latent): the cross-faded tail keeps >= 8 frames of right context,
# where HiFi-GAN's edge error is 4e-5 (1e-2 at 4 frames) and the flow's 4e-7. Cost: 16 + 12
# (context) extra vocoded frames per window.
DEFAULT_OVERLAP = 16
DEFAULT_CROSSFADE = 8
# codes before the first window. It emits 2N - DEFAULT_OVERLAP frames (20 ms each), and the next
# window comes `chunk_codes` (50) later: with 15 codes, 280 ms of audio must cover 50 decode steps
# plus a window, which a CUDA GPU does in ~80 ms (~1 ms/token, docs/performance.md); elsewhere (Apple
# GPUs: 6-10 ms/token reported by MLX ports; the CPU) 25 codes, whose 680 ms cover it
FIRST_CHUNK_CODES_CUDA = 15
FIRST_CHUNK_CODES = 25


def default_first_chunk_codes() -> int:
    """Codes before the first stream window on this device (see FIRST_CHUNK_CODES_CUDA)."""
    on_cuda = mx.default_device().type == mx.gpu and not mx.metal.is_available()
    return FIRST_CHUNK_CODES_CUDA if on_cuda else FIRST_CHUNK_CODES


def max_window_frames(first_chunk_codes: int = 25, chunk_codes: int = 50, speed: float = 1.0, *,
                      overlap_frames: int = DEFAULT_OVERLAP, context_frames: int = VOCODER_CONTEXT) -> int:
    """Most frames the reverse flow sees in one window (HiFi-GAN sees `FLOW_CONTEXT` fewer): the new
    codes' frames plus the held-back overlap, the vocoder context and the flow context. At speed 1
    with 50-code windows that is 160, one CUDA shape bucket; slower speeds stretch the frames
    (`int(T / speed) + 1`, the +2 covers the rounding of two successive windows)."""
    frames = 2 * max(first_chunk_codes, chunk_codes)
    if speed != 1:
        frames = math.ceil(frames / speed) + 2
    return frames + overlap_frames + context_frames + FLOW_CONTEXT


class SoVITSStreamDecoder:
    """Decode one utterance incrementally: `feed(codes)` returns newly finished audio, `finish()` the rest.

    Windows run when at least `first_chunk_codes` (first window) or `chunk_codes` (later windows)
    codes arrived since the previous one, so feeding one code at a time is fine. Concatenating every
    returned array gives exactly `len(SoVITS.decode(all_codes, ...))` samples.

    Built per utterance from a loaded model: `SoVITSStreamDecoder(sovits, phone_ids, ge=style, speed=...)`.
    """

    def __init__(
        self,
        model: SoVITS,
        phone_ids: np.ndarray,
        refer_spec: np.ndarray | None = None,
        *,
        ge: np.ndarray | None = None,
        speed: float = 1.0,
        noise_scale: float = 0.5,
        seed: int | None = None,
        first_chunk_codes: int = 25,
        chunk_codes: int = 50,
        overlap_frames: int = DEFAULT_OVERLAP,
        crossfade_frames: int = DEFAULT_CROSSFADE,
        context_frames: int = VOCODER_CONTEXT,
    ):
        """`phone_ids`, `refer_spec`/`ge`, `speed`, `noise_scale`, `seed` as in `SoVITS.decode`.

        `overlap_frames` (50 Hz frames) at the end of each window are held back and recomputed by the
        next window; the first `crossfade_frames` of them are cross-faded. `context_frames` of extra
        latent on the left of each window warm HiFi-GAN up (audio discarded).
        """
        if not 0 < crossfade_frames <= overlap_frames:
            raise ValueError(f"need 0 < crossfade_frames <= overlap_frames, got {crossfade_frames}, {overlap_frames}")
        if context_frames < 0 or first_chunk_codes < 1 or chunk_codes < 1:
            raise ValueError("context_frames must be >= 0 and the chunk sizes >= 1")
        self.model = model
        cfg = model.config
        phones = model.check_phones(phone_ids, speed)
        self.speed = float(speed)
        self.noise_scale = float(noise_scale)
        self.first_chunk_codes = first_chunk_codes
        self.chunk_codes = chunk_codes
        self.overlap = overlap_frames
        self.crossfade = crossfade_frames
        self.context = context_frames
        self.hop = cfg.upsample_factor
        self._frames_per_code = 2 if cfg.semantic_frame_rate == "25hz" else 1
        self._ge = model.style_array(refer_spec, ge)
        self._text = model.enc_p.encode_text(mx.array(phones.astype(np.int32))[None])  # same for every window
        mx.eval(self._ge, self._text)
        self._rng = np.random.default_rng(seed)
        self._noise = np.zeros((0, cfg.inter_channels), np.float32)
        self._codes: list[int] = []
        self._codes_at_last_window = 0
        self._done = 0  # output frames whose audio has been returned
        self._tail: np.ndarray | None = None  # held-back audio of frames [_done, _done + crossfade)
        self._finished = False
        self.windows = 0  # how many windows ran (for tests and timings)

    # ---------------------------------------------------------------- public API

    @property
    def n_codes(self) -> int:
        return len(self._codes)

    def feed(self, codes: np.ndarray | list[int] | int) -> np.ndarray:
        """Append new codes; returns newly finished float32 audio (often empty)."""
        if self._finished:
            raise RuntimeError("feed() after finish(): start a new stream decoder for the next utterance")
        new = self.model.check_codes(np.atleast_1d(np.asarray(codes)))
        self._codes.extend(int(c) for c in new)
        want = self.first_chunk_codes if self.windows == 0 else self.chunk_codes
        if self.n_codes - self._codes_at_last_window < want:
            return np.zeros(0, np.float32)
        return self._window(final=False)

    def finish(self) -> np.ndarray:
        """Decode the rest, cross-fading with the last window; returns the remaining audio."""
        if self._finished:
            return np.zeros(0, np.float32)
        self._finished = True
        if not self._codes:
            return np.zeros(0, np.float32)
        return self._window(final=True)

    # ---------------------------------------------------------------- internals

    def _n_out(self, t_src: int, final: bool) -> int:
        """Output frames a window may produce from `t_src` source frames."""
        if self.speed == 1:
            return t_src
        if final:
            return int(t_src / self.speed) + 1
        # frames whose interpolation neighbours both exist: (j + 0.5) * speed - 0.5 <= t_src - 1
        return max(0, math.floor((t_src - 0.5) / self.speed - 0.5) + 1)

    def _draw_noise(self, n_frames: int) -> np.ndarray:
        if self._noise.shape[0] < n_frames:
            more = frame_noise(self._rng, n_frames - self._noise.shape[0], self._noise.shape[1])
            self._noise = np.concatenate([self._noise, more])
        return self._noise

    def _hidden(self, codes: np.ndarray) -> mx.array:
        """enc_p's hidden frames (1, T, C) before speed and projection, over all codes so far."""
        return self.model.enc_p.hidden(self.model.codebook_frames(codes), self._text, self._ge)

    def _window(self, final: bool) -> np.ndarray:
        model = self.model
        codes = np.asarray(self._codes, np.int64)
        n_out = self._n_out(codes.size * self._frames_per_code, final)
        held = 0 if self._tail is None else self.crossfade
        end = n_out if final else n_out - self.overlap  # emit audio of frames [_done, end)
        if not final and end <= self._done + held:
            return np.zeros(0, np.float32)  # not enough new frames yet; wait for more codes
        self._codes_at_last_window = codes.size
        self.windows += 1
        start = max(0, self._done - self.context)  # HiFi-GAN window [start, n_out)
        flow_start = max(0, start - FLOW_CONTEXT)
        y = self._hidden(codes)
        if self.speed != 1:
            if final and self.windows == 1:
                y = interpolate_linear(y, n_out)  # one window: exactly upstream's grid
            else:
                y = interpolate_linear(y, n_out - flow_start, scale=self.speed, start=flow_start)
        else:
            y = y[:, flow_start:n_out]
        m_p, logs_p = model.enc_p.project(y)
        z_p = m_p
        if self.noise_scale != 0:
            eps = mx.array(self._draw_noise(n_out)[flow_start:n_out])[None]
            z_p = m_p + eps * mx.exp(logs_p) * self.noise_scale
        z = model.flow_reverse(z_p, self._ge)[:, start - flow_start :]
        audio = np.array(model.vocode(z, self._ge)[0, :, 0], dtype=np.float32)  # samples of [start, n_out)

        hop = self.hop
        out = audio[(self._done - start) * hop : (end - start) * hop].copy()
        if self._tail is not None:
            n = self._tail.size
            fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)
            out[:n] = self._tail * (1 - fade_in) + out[:n] * fade_in
        if final:
            self._tail = None
        else:
            self._tail = audio[(end - start) * hop : (end + self.crossfade - start) * hop].copy()
        logger.debug("window %d: %d codes, frames [%d, %d), emitted [%d, %d)", self.windows, codes.size, start,
                     n_out, self._done, end)
        self._done = end
        return out
