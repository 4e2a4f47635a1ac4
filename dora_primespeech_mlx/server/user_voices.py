"""Voices added through the server: one folder per voice under `$GPT_SOVITS_VOICES_DIR` (default
`~/.config/dora-primespeech-mlx/voices`), holding `voice.json` (id, transcript, language) and
`reference.wav` (the uploaded clip decoded, mixed to mono and re-written: the uploaded bytes are never
stored). Each is a zero-shot voice on the Doubao weights (`VoiceRegistry.zero_shot`). Nothing here
touches the OminiX node's voices.json or the model directory."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import MAX_REF_SECONDS, MIN_REF_SECONDS
from ..voices import SUPPORTED_LANGS, Voice, VoiceRegistry, expand_path
from .errors import ApiError

logger = logging.getLogger(__name__)

VOICES_DIR_ENV = "GPT_SOVITS_VOICES_DIR"
VOICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TRANSCRIPT_CHARS = 500
USER_VOICE_SPEED = 1.0  # the request's `speed` scales it


def default_voices_dir(env: dict | None = None) -> Path:
    """`$GPT_SOVITS_VOICES_DIR`, else `$XDG_CONFIG_HOME/dora-primespeech-mlx/voices`, else
    ~/.config/dora-primespeech-mlx/voices (user data, not a cache: kept when the cache is cleared)."""
    env = os.environ if env is None else env
    if (env.get(VOICES_DIR_ENV) or "").strip():
        return expand_path(env[VOICES_DIR_ENV].strip())
    config_home = (env.get("XDG_CONFIG_HOME") or "").strip() or "~/.config"
    return expand_path(config_home) / "dora-primespeech-mlx" / "voices"


@dataclass(frozen=True)
class UserVoice:
    voice: Voice
    language: str


class UserVoiceStore:
    """The user voices folder, read at start-up; `add` writes a new voice. Safe from any thread."""

    def __init__(self, folder: Path, registry: VoiceRegistry):
        self.folder = Path(folder)
        self.registry = registry
        self._lock = threading.Lock()
        self.voices: dict[str, UserVoice] = {}
        self.warnings: list[str] = []
        self._load()

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for entry in sorted(self.folder.iterdir()):
            meta = entry / "voice.json"
            if not meta.is_file():
                continue
            try:
                data = json.loads(meta.read_text(encoding="utf-8"))
                vid, transcript, language = data["id"], data["transcript"], data["language"]
                if not (isinstance(vid, str) and VOICE_ID.fullmatch(vid) and vid == entry.name):
                    raise ValueError(f"id {vid!r} must be the folder's name, letters, digits, - and _")
                if not isinstance(transcript, str) or language not in SUPPORTED_LANGS:
                    raise ValueError("transcript must be text and language one of " + ", ".join(SUPPORTED_LANGS))
                if not (entry / "reference.wav").is_file():
                    raise ValueError("reference.wav is missing")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                message = f"user voice {entry} skipped: {exc}"
                logger.warning("%s", message)
                self.warnings.append(message)
                continue
            self.voices[vid.lower()] = self._voice(vid, entry / "reference.wav", transcript, language)

    def _voice(self, vid: str, clip: Path, transcript: str, language: str) -> UserVoice:
        return UserVoice(self.registry.zero_shot(vid, clip, transcript, language, USER_VOICE_SPEED), language)

    def get(self, voice_id: str) -> UserVoice | None:
        return self.voices.get(voice_id.lower())

    def add(self, vid: str, transcript: str, language: str, clip: bytes, taken: set[str]) -> UserVoice:
        """Check everything, then write the folder atomically (a temporary folder renamed into place).
        `taken`: lower-case ids already in use (the registry's). Raises ApiError (400 / 409)."""
        if not VOICE_ID.fullmatch(vid or ""):
            raise ApiError(400, f"name {vid[:80]!r} is not a valid voice id: use 1-64 letters, digits, '-' or '_'",
                           "name", "invalid_voice_name")
        transcript = (transcript or "").strip()
        if not transcript or len(transcript) > MAX_TRANSCRIPT_CHARS:
            raise ApiError(400, f"transcript must be 1-{MAX_TRANSCRIPT_CHARS} characters (what the clip says), "
                                f"got {len(transcript)}", "transcript", "invalid_transcript")
        language = (language or "").strip().lower()
        if language not in SUPPORTED_LANGS:
            raise ApiError(400, f"language {language[:20]!r} is not supported: use one of "
                                f"{', '.join(SUPPORTED_LANGS)}", "language", "invalid_language")
        audio, rate = read_clip(clip)
        with self._lock:
            if vid.lower() in taken or vid.lower() in self.voices:
                raise ApiError(409, f"voice {vid!r} already exists: choose another name", "name", "voice_exists")
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{vid}-", dir=self.folder))
            try:
                import soundfile as sf

                sf.write(staging / "reference.wav", audio, rate, subtype="FLOAT")
                (staging / "voice.json").write_text(json.dumps(
                    {"id": vid, "transcript": transcript, "language": language, "created": time.time()},
                    ensure_ascii=False, indent=1), encoding="utf-8")
                staging.rename(self.folder / vid)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            voice = self._voice(vid, self.folder / vid / "reference.wav", transcript, language)
            self.voices[vid.lower()] = voice
        logger.info("user voice %r added (%.2f s clip)", vid, len(audio) / rate)
        return voice


def read_clip(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an uploaded clip (WAV, FLAC, or another format libsndfile reads) to mono float32, checking
    that it lasts 3-10 s (GPT-SoVITS's limit) from its header before reading it whole."""
    import soundfile as sf

    if not data:
        raise ApiError(400, "audio is empty: upload a 3-10 s WAV or FLAC clip", "audio", "invalid_audio")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate <= 0 or f.frames <= 0:
                raise ApiError(400, "audio holds no samples: upload a 3-10 s WAV or FLAC clip", "audio",
                               "invalid_audio")
            seconds = f.frames / f.samplerate
            if not MIN_REF_SECONDS <= seconds <= MAX_REF_SECONDS:
                raise ApiError(400, f"audio lasts {seconds:.2f} s; a voice needs a clip of {MIN_REF_SECONDS:g}-"
                                    f"{MAX_REF_SECONDS:g} s: trim or replace it", "audio", "invalid_audio_length")
            audio = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (RuntimeError, TypeError, ValueError):  # libsndfile's errors name the buffer object, not the cause
        raise ApiError(400, "audio cannot be decoded as a sound file: upload a 3-10 s WAV or FLAC clip", "audio",
                       "invalid_audio") from None
    mono = audio.mean(axis=1).astype(np.float32)
    if not np.isfinite(mono).all() or not np.abs(mono).max(initial=0.0) > 0:
        raise ApiError(400, "audio is silent or holds non-finite samples: upload a recording of speech", "audio",
                       "invalid_audio")
    return mono, rate
