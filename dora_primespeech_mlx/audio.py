"""Reference-clip loading: the voice's reference WAV -> HuBERT input and SoVITS spectrogram input.

Mirrors what dora-primespeech / GPT-SoVITS do with a reference clip:

- read with soundfile (any format libsndfile reads: WAV, FLAC, OGG, ...), mix to mono by averaging
  channels (as `librosa.load(mono=True)`);
- 16 kHz copy resampled with soxr "HQ" (librosa >= 0.10's default), 3-10 s required (upstream checks
  48000..160000 samples at 16 kHz), then 9600 zeros (0.6 s) appended: upstream's
  `int(32000 * 0.3)` at 16 kHz; the prompt codes depend on this padding;
- 32 kHz copy (soxr "HQ") for the reference spectrogram, divided by min(2, max|x|) when it clips.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .constants import HUBERT_RATE, SAMPLE_RATE

if TYPE_CHECKING:
    from .models.hubert import HubertModel
    from .models.sovits import SoVITS

logger = logging.getLogger(__name__)

__all__ = ["ReferenceAudio", "load_audio", "load_reference_audio", "reference_features",
           "HUBERT_PAD_SAMPLES", "MIN_REF_SECONDS", "MAX_REF_SECONDS"]

# upstream pads int(sampling_rate * 0.3) zeros with the 32 kHz SoVITS rate, at 16 kHz: 0.6 s
HUBERT_PAD_SAMPLES = int(SAMPLE_RATE * 0.3)
MIN_REF_SECONDS = 3.0
MAX_REF_SECONDS = 10.0


def _resample(wav: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:  # librosa.load skips resampling too
        return wav
    import soxr

    return soxr.resample(wav, rate, target, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform of an audio file at `sample_rate` (soxr HQ), like `librosa.load(path, sr=...)`."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: reference audio not found; check the voice's ref_wav path")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except Exception as exc:  # libsndfile's errors are RuntimeError/LibsndfileError with terse text
        raise ValueError(f"{path}: cannot read audio ({exc}); convert it to WAV or FLAC") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples; record a 3-10 s reference clip")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: the audio holds NaN or infinite samples; re-export the clip as 16-bit PCM WAV")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return _resample(np.ascontiguousarray(mono), int(rate), sample_rate)


@dataclass(frozen=True)
class ReferenceAudio:
    """A reference clip ready for the encoders."""

    path: Path
    wav16k_padded: np.ndarray  # (N16 + 9600,) float32, HuBERT input
    wav32k: np.ndarray  # (N32,) float32, spectrogram input

    @property
    def seconds(self) -> float:
        """Duration of the clip itself (without the HuBERT padding)."""
        return (self.wav16k_padded.shape[0] - HUBERT_PAD_SAMPLES) / HUBERT_RATE


def _check_duration_before_reading(path: Path) -> None:
    """Refuse a clip far outside 3-10 s from its header, before a multi-GB file is read whole."""
    import soundfile as sf

    if not path.is_file():
        return  # load_audio names the missing file
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - unreadable headers are reported by load_audio
        return
    if info.samplerate > 0 and info.frames > 0:
        seconds = info.frames / info.samplerate
        if seconds > 2 * MAX_REF_SECONDS:
            raise ValueError(f"{path}: reference audio lasts {seconds:.1f} s; GPT-SoVITS needs a clip of "
                             f"{MIN_REF_SECONDS:g}-{MAX_REF_SECONDS:g} s. Trim or replace the reference clip.")


def load_reference_audio(path: str | Path) -> ReferenceAudio:
    """Read a reference clip for a voice; it must last 3-10 s (GPT-SoVITS's limit)."""
    path = Path(path)
    _check_duration_before_reading(path)
    wav16k = load_audio(path, HUBERT_RATE)
    n = wav16k.shape[0]
    if not MIN_REF_SECONDS * HUBERT_RATE <= n <= MAX_REF_SECONDS * HUBERT_RATE:
        raise ValueError(
            f"{path}: reference audio lasts {n / HUBERT_RATE:.2f} s; GPT-SoVITS needs a clip of "
            f"{MIN_REF_SECONDS:g}-{MAX_REF_SECONDS:g} s. Trim or replace the reference clip."
        )
    padded = np.concatenate([wav16k, np.zeros(HUBERT_PAD_SAMPLES, np.float32)])
    wav32k = load_audio(path, SAMPLE_RATE)
    peak = float(np.abs(wav32k).max())
    if peak > 1.0:  # as TTS._get_ref_spec: tame clipping without fully normalising
        wav32k = wav32k / min(2.0, peak)
    return ReferenceAudio(path=path, wav16k_padded=padded, wav32k=wav32k.astype(np.float32, copy=False))


def reference_features(
    wav_path: str | Path | ReferenceAudio, hubert: "HubertModel", sovits: "SoVITS"
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt semantic codes `(P,)` int64 and reference spectrogram `(1025, F)` float32 of a reference clip.

    codes = SoVITS `extract_latent`(HuBERT last hidden state of the padded 16 kHz clip);
    spectrogram = SoVITS linear spectrogram of the 32 kHz clip. Compute once per voice and cache.
    """
    ref = wav_path if isinstance(wav_path, ReferenceAudio) else load_reference_audio(wav_path)
    codes = sovits.extract_latent(hubert(ref.wav16k_padded))
    spec = sovits.spectrogram(ref.wav32k)
    logger.info("reference %s: %.2f s, %d prompt codes, %d spectrogram frames",
                ref.path, ref.seconds, codes.shape[-1], spec.shape[-1])
    return codes, spec
