"""Per-call synthesis options and the audio the engine yields."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .constants import SAMPLE_RATE


class SynthesisCancelled(Exception):
    """Raised inside a synthesis generator once its request was cancelled (`Engine.cancel()`)."""


class NothingToSpeak(ValueError):
    """The text holds nothing the engine can speak (punctuation, emoji, symbols, or only sentences
    that had to be skipped). Adapters answer it as `empty`, not as an error. `notes` says what was
    skipped and why (empty when the text simply has no phones)."""

    def __init__(self, message: str, notes: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.notes = tuple(notes)


class WrongThreadError(RuntimeError):
    """An MLX-evaluating engine method was called from a thread other than the engine's owner.

    Since MLX 0.31.2 GPU streams, compiled graphs and convolution plans belong to the thread that
    made them; work handed to another thread fails on a GPU ("There is no Stream(gpu, 0) in current
    thread") and silently works on the CPU. The engine refuses it on every device so CI sees it.
    """


@dataclass(frozen=True)
class SynthesisOptions:
    """Options for one synthesis call. `None` means "the voice's (or upstream's) default".

    Defaults are what dora-primespeech effectively runs with (interface doc 4.3): top_k 5, top_p 1,
    temperature 1, repetition penalty 1.35, seed 233333, SoVITS noise scale 0.5.
    """

    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.35
    noise_scale: float = 0.5
    speed: float | None = None  # None: the voice's speed_factor
    seed: int | None = 233333
    fragment_interval: float | None = None  # seconds of silence after each sentence; None: 0.07
    text_lang: str | None = None  # None: the voice's text_lang
    max_new_tokens: int | None = None  # per sentence; None: upstream's cap

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale={self.noise_scale}: must be >= 0")
        if self.speed is not None and self.speed <= 0:
            raise ValueError(f"speed={self.speed}: must be > 0")
        if self.fragment_interval is not None and self.fragment_interval < 0:
            raise ValueError(f"fragment_interval={self.fragment_interval}: must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


@dataclass
class AudioChunk:
    """A piece of synthesised audio: float32 mono in [-1, 1] plus where it belongs and what it cost."""

    audio: np.ndarray
    sample_rate: int = SAMPLE_RATE
    sentence_index: int = 0
    chunk_index: int = 0
    is_final: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds, per stage
    notes: tuple[str, ...] = ()  # warnings about this stretch of text (a skipped sentence, a cut piece)

    @property
    def duration(self) -> float:
        return float(len(self.audio)) / float(self.sample_rate)


def join_audio(chunks: Iterable[AudioChunk]) -> np.ndarray:
    """The chunks' audio end to end as float32 (empty when there are none): every adapter and the
    engine's whole-text call join the same way."""
    parts = [np.asarray(chunk.audio, dtype=np.float32) for chunk in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
