"""Voice registry: the 15 built-in PrimeSpeech voices, user voices, mofa-studio characters, payload clips.

Built-in voices are data (`voices/builtin.json`), not code. Other files are all optional, and none
of them can stop the engine: a file that cannot be read, has the wrong shape or holds a bad entry is
skipped (the whole file or that entry) and the reason is kept in `VoiceRegistry.warnings` /
`CharacterTable.load`'s warnings, naming the file, for the node's `log` output.

- User voices, the schema of `builtin.json` (a list, or `{"voices": [...]}`):
  `$PRIMESPEECH_MODEL_DIR/voices-mlx.json` and the file named by `$PRIMESPEECH_VOICES_FILE`; also
  `$PRIMESPEECH_MODEL_DIR/voices.json` when it has this list schema (older setups). Relative file
  names resolve against `$PRIMESPEECH_MODEL_DIR/moyoyo/`; `~` and `$VAR` are expanded (these files
  are the operator's).
- Characters: the `voices.json` of mofa-studio's Rust node `dora-gpt-sovits-mlx`
  (`{"default_voice", "models_base_path", "voices": {id: {"ref_audio", "ref_text", "speed_factor"?,
  "aliases"?}}}`), read from `$VOICES_CONFIG`, else `$PRIMESPEECH_MODEL_DIR/voices.json`, else
  `~/.dora/models/primespeech/voices.json`. Nothing here writes that file.
- Payload voices (`VOICE:CUSTOM`, `VOICE:TRAINED`): paths come from whoever sends the text (an LLM,
  say), so they are taken literally: never `~`/`$VAR`-expanded, absolute, and checked to be files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

BUILTIN_FILE = Path(__file__).resolve().parent / "_data" / "voices" / "builtin.json"
from .constants import DEFAULT_MODEL_DIR

SUPPORTED_LANGS = ("zh", "en", "auto", "all_zh")
# VOICE:CUSTOM clones on the Doubao weights, as dora-primespeech does
CUSTOM_BASE_VOICE = "Doubao"
USER_VOICES_FILE = "voices-mlx.json"  # our user voices; the name voices.json belongs to dora-gpt-sovits-mlx
CHARACTERS_FILE = "voices.json"
DEFAULT_CHARACTERS_PATH = DEFAULT_MODEL_DIR + "/voices.json"  # where dora-gpt-sovits-mlx looks
CHARACTER_SPEED = 1.0  # dora-gpt-sovits-mlx's speed for a character without speed_factor
PAYLOAD_SPEED = 1.1  # VOICE:CUSTOM (dora-primespeech) and VOICE:TRAINED (Moxin-Voice)
SPEED_RANGE = (0.25, 4.0)

# mofa-studio's character ids (mofa-fm's VOICE_CHARACTER) -> our built-in voice (None: there is none)
MOFA_CHARACTERS: dict[str, str | None] = {
    "doubao": "Doubao", "dnz": "Zhao Daniu", "yfc": "Chen Yifan", "luoxiang": "Luo Xiang",
    "yangmi": "Yang Mi", "mayun": "Ma Yun", "bys": "BYS", "marc": None,
}
MOFA_ALIASES = {"daniu": "dnz", "zhaodaniu": "dnz", "yifan": "yfc", "chenyifan": "yfc", "luo": "luoxiang",
                "default": "doubao", "yang": "yangmi", "ma": "mayun", "fewshot": "marc"}
_MOFA_NAMES = {"marc": "Marc"}  # display names of the ids without a built-in voice


def expand_path(path: str | os.PathLike) -> Path:
    """Expand `~` and `$VAR`/`${VAR}`: for the operator's configuration only, never for payloads."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def resolve_model_dir(value: str | None = None) -> Path:
    return expand_path(value or os.environ.get("PRIMESPEECH_MODEL_DIR") or DEFAULT_MODEL_DIR)


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters for a message (payloads may be huge)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _voice_from_entry(entry: object, moyoyo: Path, source: str) -> Voice:
    try:
        if not isinstance(entry, dict):
            raise TypeError("not an object")
        vid = entry["id"]
        if not isinstance(vid, str) or not vid.strip():
            raise TypeError("id must be a non-empty string")
        for key in ("gpt_weights", "sovits_weights", "reference_audio", "prompt_text"):
            if not isinstance(entry[key], str):
                raise TypeError(f"{key} must be a string")
        files = {k: moyoyo / expand_path(entry[k]) for k in ("gpt_weights", "sovits_weights", "reference_audio")}
        prompt_lang = str(entry.get("prompt_lang", "zh"))
        text_lang = str(entry.get("text_lang", prompt_lang))
        speed = float(entry.get("speed_factor", 1.0))
        prompt_text = entry["prompt_text"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: voice entry {shorten(repr(entry))} is invalid ({exc!r}); each voice needs "
                         "id, gpt_weights, sovits_weights, reference_audio and prompt_text") from None
    for lang in (prompt_lang, text_lang):
        if lang not in SUPPORTED_LANGS:
            raise ValueError(f"{source}: voice {vid!r} has language {lang!r}; use one of {SUPPORTED_LANGS}")
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"{source}: voice {vid!r} has speed_factor {speed}; it must be > 0")
    return Voice(vid, **files, prompt_text=prompt_text, prompt_lang=prompt_lang, text_lang=text_lang,
                 speed_factor=speed)


def read_json_file(path: Path) -> tuple[object, str | None]:
    """(data, None), or (None, why it cannot be used): never raises."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        return None, f"cannot be read ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError) as exc:
        return None, f"is not valid JSON ({exc})"


def voices_file_schema(data: object) -> str | None:
    """"list" (our voices: a list, or an object with a "voices" list), "characters"
    (dora-gpt-sovits-mlx: an object with a "voices" object) or None (neither)."""
    if isinstance(data, list):
        return "list"
    if isinstance(data, dict):
        if isinstance(data.get("voices"), list):
            return "list"
        if isinstance(data.get("voices"), dict):
            return "characters"
    return None


def _entries(data: object) -> list:
    return data if isinstance(data, list) else data["voices"]  # type: ignore[index]


class VoiceRegistry:
    """Built-in plus user voices for one model directory; plain Python, safe from any thread.

    Never raises on a user file: what it skips is in `warnings` (also logged).
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, user_file: str | os.PathLike | None = None):
        self.model_dir = resolve_model_dir(str(model_dir) if model_dir else None)
        self.moyoyo = self.model_dir / "moyoyo"
        self.warnings: list[str] = []
        builtin = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))  # our own data: errors are bugs
        voices = [_voice_from_entry(e, self.moyoyo, str(BUILTIN_FILE)) for e in _entries(builtin)]
        self.builtin_ids = tuple(v.id for v in voices)
        self._voices = {v.id: v for v in voices}
        env_file = user_file or os.environ.get("PRIMESPEECH_VOICES_FILE")
        self._read_user_file(self.model_dir / CHARACTERS_FILE, legacy=True)
        self._read_user_file(self.model_dir / USER_VOICES_FILE)
        if env_file:
            self._read_user_file(expand_path(env_file), explicit=True)

    def _warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)

    def _read_user_file(self, path: Path, *, legacy: bool = False, explicit: bool = False) -> None:
        try:
            exists = path.exists()
        except (OSError, ValueError):
            exists = False
        if not exists:
            if explicit:
                self._warn(f"voices file {path} (PRIMESPEECH_VOICES_FILE) does not exist; only the other voices are "
                           "available")
            return
        data, problem = read_json_file(path)
        schema = voices_file_schema(data) if problem is None else None
        if schema == "characters" and legacy:
            return  # dora-gpt-sovits-mlx's character file: read by CharacterTable, not here
        if schema != "list":
            why = problem or ("is dora-gpt-sovits-mlx's character map; name it in VOICES_CONFIG instead"
                              if schema == "characters" else
                              "is neither a list of voices (voices/builtin.json's schema) nor "
                              "dora-gpt-sovits-mlx's character map")
            self._warn(f"voices file {path} {why}; skipped it, built-in voices are unaffected")
            return
        loaded = []
        for entry in _entries(data):
            try:
                voice = _voice_from_entry(entry, self.moyoyo, str(path))
            except ValueError as exc:
                self._warn(f"{exc}; skipped that entry")
                continue
            self._voices[voice.id] = voice  # user entries override built-ins of the same id
            loaded.append(voice.id)
        hint = f" (consider renaming it {USER_VOICES_FILE}: dora-gpt-sovits-mlx reads {CHARACTERS_FILE})" if legacy else ""
        logger.info("loaded %d user voice(s) from %s%s", len(loaded), path, hint)

    def ids(self) -> list[str]:
        return list(self._voices)

    def __contains__(self, voice_id: object) -> bool:
        return voice_id in self._voices

    def get(self, voice_id: str) -> Voice:
        try:
            return self._voices[voice_id]
        except KeyError:
            raise KeyError(f"unknown voice {voice_id!r}; known voices: {', '.join(self._voices)}") from None

    def zero_shot(self, voice_id: str, reference_audio: Path, prompt_text: str, lang: str, speed: float) -> Voice:
        """A voice from a reference clip and its transcript on the Doubao weights."""
        base = self.get(CUSTOM_BASE_VOICE)
        lang = lang if lang in SUPPORTED_LANGS else "auto"
        return replace(base, id=voice_id, reference_audio=reference_audio, prompt_text=prompt_text,
                       prompt_lang=lang, text_lang=lang, speed_factor=speed)

    def custom(self, reference_audio: str | os.PathLike, prompt_text: str, prompt_lang: str) -> Voice:
        """A zero-shot voice from a user clip on the Doubao weights (`VOICE:CUSTOM|...`).

        The path is taken literally (no `~`/`$VAR` expansion: it comes from a payload) and must be
        absolute; `payload_file` checks that it is a file.
        """
        ref = _absolute(reference_audio, "VOICE:CUSTOM reference clip")
        return self.zero_shot(f"CUSTOM:{ref}", ref, prompt_text, prompt_lang, PAYLOAD_SPEED)

    def trained(self, gpt_weights: str | os.PathLike, sovits_weights: str | os.PathLike,
                reference_audio: str | os.PathLike, prompt_text: str, prompt_lang: str) -> Voice:
        """A voice with its own trained GPT/SoVITS weights and reference (Moxin-Voice's `VOICE:TRAINED|...`).

        Paths are literal and absolute, as for `custom`. The weights are read by the torch-free
        reader, which runs no code from a pickle and accepts only GPT-SoVITS v2 checkpoints.
        """
        gpt = _absolute(gpt_weights, "VOICE:TRAINED GPT weights")
        sovits = _absolute(sovits_weights, "VOICE:TRAINED SoVITS weights")
        ref = _absolute(reference_audio, "VOICE:TRAINED reference clip")
        lang = prompt_lang if prompt_lang in SUPPORTED_LANGS else "auto"
        return Voice(f"TRAINED:{gpt}|{sovits}", gpt, sovits, ref, prompt_text, lang, lang, PAYLOAD_SPEED)


def _absolute(path: str | os.PathLike, what: str) -> Path:
    text = str(path)
    if not text.strip():
        raise ValueError(f"{what}: the path is empty; send an absolute path")
    if not Path(text).is_absolute():
        raise ValueError(f"{what} {shorten(text)!r} is not an absolute path (`~` and `$VAR` are not expanded "
                         "in payloads); send an absolute path")
    return Path(text)


def payload_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = (),
                 allowed_dirs: tuple[Path, ...] | None = None) -> Path:
    """Check a path sent in a payload: absolute, usable by the OS, an existing regular file with one of
    `suffixes` and, when `allowed_dirs` is given (the operator's ALLOWED_VOICE_DIRS, resolved), inside
    one of them once `..` and symbolic links are resolved. Raises ValueError/FileNotFoundError whose
    message holds only what was sent (cut short)."""
    p = _absolute(path, what)
    shown = shorten(str(path))
    try:
        # checked before existence: outside the allowed folders, a payload learns nothing about the disk
        real = Path(os.path.realpath(p)) if allowed_dirs is not None else None
        outside = real is not None and not any(real.is_relative_to(folder) for folder in allowed_dirs)
        is_file = not outside and p.is_file()
    except (OSError, ValueError) as exc:  # e.g. ENAMETOOLONG, embedded NUL
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ValueError(f"{what} {shown!r} cannot be used: {reason}") from None
    if outside:
        raise PermissionError(f"{what} {shown!r} is outside the folders this node reads payload files "
                              "from (ALLOWED_VOICE_DIRS); put the file in one of them")
    if not is_file:
        raise FileNotFoundError(f"{what} {shown!r} does not exist or is not a file; send an absolute path to "
                                "an existing file")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {shown!r} must be a {' or '.join(suffixes)} file")
    return p


# ------------------------------------------------------------------------------ characters


@dataclass(frozen=True)
class Character:
    """One entry of dora-gpt-sovits-mlx's voices.json, paths resolved (`~` expanded, never `$VAR`)."""

    id: str  # lower-case
    ref_audio: Path
    ref_text: str
    speed_factor: float | None = None
    aliases: tuple[str, ...] = ()


class CharacterTable:
    """dora-gpt-sovits-mlx's voice characters: ids and aliases matched case-insensitively."""

    def __init__(self, path: Path, characters: dict[str, Character], default_voice: str | None = None):
        self.path = path
        self.characters = characters
        self.default_voice = default_voice

    @classmethod
    def from_data(cls, data: dict, path: Path) -> tuple[CharacterTable, list[str]]:
        """Build from the parsed file (`voices_file_schema(data) == "characters"`); bad entries are
        skipped, each named in the returned warnings."""
        warnings: list[str] = []
        base_raw = data.get("models_base_path", DEFAULT_MODEL_DIR)
        if not isinstance(base_raw, str) or not base_raw.strip():
            warnings.append(f"{path}: models_base_path {shorten(repr(base_raw))} is not a path; using {DEFAULT_MODEL_DIR}")
            base_raw = DEFAULT_MODEL_DIR
        base = Path(os.path.expanduser(base_raw))
        default = data.get("default_voice")
        characters: dict[str, Character] = {}
        for key, entry in data["voices"].items():
            cid = key.strip().lower()
            try:
                characters[cid] = _character(cid, entry, base, taken=characters)
            except ValueError as exc:
                warnings.append(f"{path}: character {shorten(key)!r} skipped: {exc}")
        return cls(path, characters, default if isinstance(default, str) else None), warnings

    @classmethod
    def load(cls, path: Path) -> tuple[CharacterTable | None, list[str]]:
        """Read one file; (None, [why]) when it is not a usable character file. Never raises."""
        data, problem = read_json_file(path)
        if problem is None and voices_file_schema(data) != "characters":
            problem = "is not dora-gpt-sovits-mlx's character map ({\"voices\": {id: {ref_audio, ref_text}}})"
        if problem is not None:
            return None, [f"voices file {path} {problem}; no characters read from it"]
        return cls.from_data(data, path)  # type: ignore[arg-type]

    def find(self, name: str) -> Character | None:
        key = name.strip().lower()
        if key in self.characters:
            return self.characters[key]
        for character in self.characters.values():
            if key in character.aliases:
                return character
        return None

    def ids(self) -> list[str]:
        return list(self.characters)


def _character(cid: str, entry: object, base: Path, taken: dict[str, Character]) -> Character:
    if not cid:
        raise ValueError("empty id")
    if cid in taken:
        raise ValueError("the same id (case-insensitively) appears twice")
    if not isinstance(entry, dict):
        raise ValueError("not an object")  # noqa: TRY004 - bad file content, reported like the others
    ref, text = entry.get("ref_audio"), entry.get("ref_text")
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError("ref_audio must be a non-empty string")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("ref_text must be a non-empty string")
    speed = entry.get("speed_factor")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
                or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise ValueError(f"speed_factor {shorten(repr(speed))} must be a number in {SPEED_RANGE[0]}-{SPEED_RANGE[1]}")
        speed = float(speed)
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError("aliases must be a list of strings")
    ref = ref.strip()
    # dora-gpt-sovits-mlx: absolute or `~` paths as they are, others under models_base_path
    path = Path(os.path.expanduser(ref)) if ref.startswith(("/", "~")) else base / ref
    return Character(cid, path, text.strip(), speed, tuple(a.strip().lower() for a in aliases if a.strip()))


def find_characters_file(model_dir: Path, voices_config: Path | None = None) -> tuple[CharacterTable | None, list[str]]:
    """dora-gpt-sovits-mlx's character table: `voices_config` ($VOICES_CONFIG) when given, else the first
    character map among `<model_dir>/voices.json` and `~/.dora/models/primespeech/voices.json`.

    Returns (table or None, warnings). A `<model_dir>/voices.json` of another shape is VoiceRegistry's
    to report; never raises.
    """
    if voices_config is not None:
        try:
            exists = voices_config.is_file()
        except (OSError, ValueError):
            exists = False
        if not exists:
            return None, [f"VOICES_CONFIG={voices_config} is not a file; no voice characters read"]
        return CharacterTable.load(voices_config)
    own = model_dir / CHARACTERS_FILE
    home = Path(os.path.expanduser(DEFAULT_CHARACTERS_PATH))
    for path in dict.fromkeys((own, home)):
        try:
            if not path.is_file():
                continue
        except (OSError, ValueError):
            continue
        data, problem = read_json_file(path)
        if problem is None and voices_file_schema(data) == "characters":
            return CharacterTable.from_data(data, path)  # type: ignore[arg-type]
        if path != own and voices_file_schema(data) != "list":
            why = problem or "is not dora-gpt-sovits-mlx's character map"
            return None, [f"voices file {path} {why}; no voice characters read"]
    return None, []


@dataclass(frozen=True)
class Resolved:
    """A voice name resolved: the voice (None when the name is known but has no voice here), how it
    was found, and the problem when there is no voice."""

    voice: Voice | None
    how: str
    problem: str | None = None
    zero_shot: bool = False


def builtin_for(name: str, registry: VoiceRegistry) -> tuple[bool, str | None]:
    """(known, built-in voice id) for a mofa-studio id or alias, or a voice id written in any case and
    with or without spaces ("luoxiang", "zhao daniu"); (False, None) when unknown."""
    key = name.strip().lower()
    key = MOFA_ALIASES.get(key, key)
    if key in MOFA_CHARACTERS:
        return True, MOFA_CHARACTERS[key]
    squeezed = key.replace(" ", "")
    for vid in registry.ids():
        if vid.lower().replace(" ", "") == squeezed:
            return True, vid
    return False, None


def resolve_voice(name: str, registry: VoiceRegistry, characters: CharacterTable | None = None) -> Resolved | None:
    """Find the voice for a VOICE_NAME / VOICE_CHARACTER / `VOICE:<id>` value.

    Order: an exact voice id; a character of dora-gpt-sovits-mlx's voices.json (its id or an alias,
    any case): one of our built-in voices when it names one (its own fine-tuned weights and clip),
    else a zero-shot voice from its ref_audio/ref_text on the Doubao weights; mofa-studio's ids and
    aliases (the built-in table) and voice ids in any case. None when nothing matches.
    """
    if name in registry:
        return Resolved(registry.get(name), "a voice id")
    if characters is not None:
        character = characters.find(name)
        if character is not None:
            for key in (character.id, *character.aliases):
                known, vid = builtin_for(key, registry)
                if known and vid is not None:
                    return Resolved(registry.get(vid), f"character {character.id!r} of {characters.path}, "
                                                       f"which is our built-in voice {vid!r}")
            voice = registry.zero_shot(character.id, character.ref_audio, character.ref_text, "auto",
                                       character.speed_factor or CHARACTER_SPEED)
            return Resolved(voice, f"character {character.id!r} of {characters.path}, zero-shot from its "
                                   f"reference clip on {CUSTOM_BASE_VOICE}'s weights", zero_shot=True)
    known, vid = builtin_for(name, registry)
    if known and vid is not None:
        return Resolved(registry.get(vid), f"the built-in table of mofa-studio ids: {vid!r}")
    if known:
        key = MOFA_ALIASES.get(name.strip().lower(), name.strip().lower())
        return Resolved(None, "the built-in table of mofa-studio ids",
                        problem=f"is mofa-studio's {key!r} ({_MOFA_NAMES.get(key, key)}), which has no built-in voice "
                                "here; describe it (ref_audio, ref_text) in dora-gpt-sovits-mlx's voices.json or the "
                                "file VOICES_CONFIG names")
    return None


def known_names(registry: VoiceRegistry, characters: CharacterTable | None = None) -> list[str]:
    """Every name `resolve_voice` accepts (aliases aside), for messages."""
    names = registry.ids() + (characters.ids() if characters is not None else [])
    names += [k for k, v in MOFA_CHARACTERS.items() if v is not None]
    seen: set[str] = set()
    out = []
    for n in names:  # one spelling per name ("Doubao", not also "doubao")
        key = n.lower().replace(" ", "")
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out
