"""Response formats: streamed `pcm` (16-bit LE mono, 24 kHz) and `wav` (16-bit mono, 32 kHz, streaming
header), whole-file `flac` and `mp3` (libsndfile through soundfile; its MP3 encoder is LAME)."""

from __future__ import annotations

import functools
import io
import struct

import numpy as np

from ..constants import SAMPLE_RATE

PCM_RATE = 24000  # OpenAI's `pcm`: raw 16-bit little-endian mono at 24 kHz
STREAMED = ("pcm", "wav")
WHOLE = ("flac", "mp3")
FORMATS = STREAMED + WHOLE
MEDIA_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}
UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF and data sizes while streaming: the length is not known yet


def pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> 16-bit little-endian PCM bytes (clipped, rounded)."""
    clipped = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header whose RIFF and data sizes are 0xFFFFFFFF (unknown while streaming;
    readers take the data to the end of the body)."""
    return (b"RIFF" + struct.pack("<I", UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", UNKNOWN_SIZE))


class StreamEncoder:
    """Turns the engine's float32 32 kHz chunks into the bytes of a streamed format, one call per chunk."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE):
        if fmt not in STREAMED:
            raise ValueError(f"{fmt!r} is not a streamed format; use one of {STREAMED}")
        self.fmt = fmt
        self._resampler = None
        if fmt == "pcm" and sample_rate != PCM_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, PCM_RATE, 1, dtype="float32", quality="HQ")
        self._header = wav_stream_header(sample_rate) if fmt == "wav" else b""

    def feed(self, audio: np.ndarray, last: bool = False) -> bytes:
        audio = np.asarray(audio, np.float32)
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio, last=last)
        out, self._header = self._header + pcm16(audio), b""
        return out

    def finish(self) -> bytes:
        """What the resampler still holds (its filter's tail), and the header if no chunk came."""
        return self.feed(np.zeros(0, np.float32), last=True)


def encode_whole(fmt: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A complete `flac` (16-bit) or `mp3` file of `audio`: CPU work, run it off the event loop."""
    import soundfile as sf

    if fmt not in WHOLE:
        raise ValueError(f"{fmt!r} is not a whole-file format; use one of {WHOLE}")
    buffer = io.BytesIO()
    audio = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    if fmt == "flac":
        sf.write(buffer, audio, sample_rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(buffer, audio, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    return buffer.getvalue()


@functools.cache
def mp3_available() -> bool:
    """Whether this libsndfile writes MP3 (1.1.0 and later, built with LAME and mpg123)."""
    try:
        import soundfile as sf

        return "MP3" in sf.available_formats()
    except (ImportError, OSError):
        return False
