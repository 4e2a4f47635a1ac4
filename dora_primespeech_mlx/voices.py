"""Voice registry: the 15 built-in PrimeSpeech voices, user voices from a data file, and custom clips.

Built-in voices are data (`voices/builtin.json`), not code. Users add or override voices with a JSON
file of the same schema at `$PRIMESPEECH_MODEL_DIR/voices.json` or at the path in
`$PRIMESPEECH_VOICES_FILE`. Relative file names resolve against `$PRIMESPEECH_MODEL_DIR/moyoyo/`;
`~` and `$VAR` are expanded everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_FILE = Path(__file__).resolve().parent / "_data" / "voices" / "builtin.json"
DEFAULT_MODEL_DIR = "~/.dora/models/primespeech"
SUPPORTED_LANGS = ("zh", "en", "auto", "all_zh")
# VOICE:CUSTOM clones on the Doubao weights, as dora-primespeech does
CUSTOM_BASE_VOICE = "Doubao"


def expand_path(path: str | os.PathLike) -> Path:
    """Expand `~` and `$VAR`/`${VAR}` (primespeech expanded them inconsistently; we always do)."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def resolve_model_dir(value: str | None = None) -> Path:
    return expand_path(value or os.environ.get("PRIMESPEECH_MODEL_DIR") or DEFAULT_MODEL_DIR)


@dataclass(frozen=True)
class Voice:
    """One voice: its GPT/SoVITS weights, reference clip and transcript, language and speed."""

    id: str
    gpt_weights: Path
    sovits_weights: Path
    reference_audio: Path
    prompt_text: str
    prompt_lang: str
    text_lang: str
    speed_factor: float = 1.0

    def missing_files(self) -> list[Path]:
        return [p for p in (self.gpt_weights, self.sovits_weights, self.reference_audio) if not p.exists()]


def _voice_from_entry(entry: dict, moyoyo: Path, source: str) -> Voice:
    try:
        vid = str(entry["id"])
        files = {k: moyoyo / expand_path(entry[k]) for k in ("gpt_weights", "sovits_weights", "reference_audio")}
        prompt_lang = str(entry.get("prompt_lang", "zh"))
        text_lang = str(entry.get("text_lang", prompt_lang))
        speed = float(entry.get("speed_factor", 1.0))
        prompt_text = str(entry["prompt_text"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: voice entry {entry!r} is invalid ({exc!r}); each voice needs id, "
                         "gpt_weights, sovits_weights, reference_audio and prompt_text") from None
    for lang in (prompt_lang, text_lang):
        if lang not in SUPPORTED_LANGS:
            raise ValueError(f"{source}: voice {vid!r} has language {lang!r}; use one of {SUPPORTED_LANGS}")
    if not speed > 0:
        raise ValueError(f"{source}: voice {vid!r} has speed_factor {speed}; it must be > 0")
    return Voice(vid, **files, prompt_text=prompt_text, prompt_lang=prompt_lang, text_lang=text_lang,
                 speed_factor=speed)


def _read_registry_file(path: Path, moyoyo: Path) -> list[Voice]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the voices file") from None
    entries = data["voices"] if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of voices or an object with a 'voices' list")
    return [_voice_from_entry(e, moyoyo, str(path)) for e in entries]


class VoiceRegistry:
    """Built-in plus user voices for one model directory."""

    def __init__(self, model_dir: str | os.PathLike | None = None, user_file: str | os.PathLike | None = None):
        self.model_dir = resolve_model_dir(str(model_dir) if model_dir else None)
        self.moyoyo = self.model_dir / "moyoyo"
        voices = _read_registry_file(BUILTIN_FILE, self.moyoyo)
        self.builtin_ids = tuple(v.id for v in voices)
        user_paths = [self.model_dir / "voices.json"]
        env_file = user_file or os.environ.get("PRIMESPEECH_VOICES_FILE")
        if env_file:
            user_paths.append(expand_path(env_file))
        self._voices = {v.id: v for v in voices}
        for path in user_paths:
            if path.exists():
                for v in _read_registry_file(path, self.moyoyo):
                    self._voices[v.id] = v  # user entries override built-ins of the same id
                logger.info("loaded user voices from %s", path)

    def ids(self) -> list[str]:
        return list(self._voices)

    def __contains__(self, voice_id: str) -> bool:
        return voice_id in self._voices

    def get(self, voice_id: str) -> Voice:
        try:
            return self._voices[voice_id]
        except KeyError:
            raise KeyError(f"unknown voice {voice_id!r}; known voices: {', '.join(self._voices)}") from None

    def custom(self, reference_audio: str, prompt_text: str, prompt_lang: str) -> Voice:
        """A zero-shot voice from a user clip on the Doubao weights (`VOICE:CUSTOM|...`)."""
        base = self.get(CUSTOM_BASE_VOICE)
        lang = prompt_lang if prompt_lang in SUPPORTED_LANGS else "auto"
        ref = expand_path(reference_audio)
        return replace(base, id=f"CUSTOM:{ref}", reference_audio=ref, prompt_text=prompt_text,
                       prompt_lang=lang, text_lang=lang, speed_factor=1.1)
