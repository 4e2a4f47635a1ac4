"""What arrives on the node's `text` input, parsed without trusting it: Arrow values of any type,
JSON or plain text, `VOICE:...|` prefixes; every string made valid UTF-8."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# characters that alone make a text unspeakable (primespeech's list; " and ' are ASCII there)
PUNCTUATION_ONLY = set("。！？.!?,，、；：\"\"''（）【】《》\n\r\t ") | set("“”‘’")
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TextRequest:
    """A parsed `text` input."""

    text: str
    voice_id: str | None = None  # VOICE:<id>|...
    custom: tuple[str, str, str] | None = None  # VOICE:CUSTOM|ref|prompt|lang|... -> (ref, prompt, lang)
    # VOICE:TRAINED|gpt|sovits|ref|prompt|lang|... (Moxin-Voice) -> (gpt, sovits, ref, prompt, lang)
    trained: tuple[str, str, str, str, str] | None = None
    notes: tuple[str, ...] = ()


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (JSON `\\ud800` escapes, undecodable environment bytes) replaced by
    U+FFFD, so it encodes as UTF-8 (Arrow and Dora refuse anything else)."""
    return _SURROGATES.sub("\ufffd", text)


def _prompt_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # numbers, booleans, lists: as written


def arrow_text(value: Any) -> str:
    """Element 0 of the input as a string, whatever Arrow type arrived; never raises."""
    try:
        items = value.to_pylist() if hasattr(value, "to_pylist") else list(value)
    except Exception:  # noqa: BLE001 - a payload must never crash the node
        return str(value)
    if not items:
        return ""
    first = items[0]
    if first is None:
        return ""
    if isinstance(first, bytes):
        return first.decode("utf-8", errors="replace")
    if isinstance(first, list):  # list<...> payloads: join what is inside
        return "".join(str(x) for x in first if x is not None)
    return str(first)


def parse_text_payload(raw: str) -> TextRequest:
    """Unwrap `{"prompt": ...}` JSON and a `VOICE:` prefix. A JSON object without "prompt" is nothing
    to speak (as upstream); other JSON (numbers, lists, ...) and invalid JSON are plain text."""
    text = raw
    stripped = raw.strip()
    if stripped.startswith("{"):
        try:  # numbers stay as written: int() refuses more than 4300 digits, and "1.50" stays "1.50"
            obj = json.loads(stripped, parse_int=str, parse_float=str)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            obj = None
        if isinstance(obj, dict):
            text = _prompt_text(obj.get("prompt"))
    text = valid_unicode(text)
    if not text.startswith("VOICE:"):
        return TextRequest(text)
    head, sep, rest = text[len("VOICE:"):].partition("|")
    name = head.strip()
    if not sep:
        return TextRequest(text, notes=("'VOICE:' prefix without '|': speaking the text as given",))
    if name == "CUSTOM":
        parts = rest.split("|", 3)
        if len(parts) != 4:
            return TextRequest(text, notes=("VOICE:CUSTOM needs VOICE:CUSTOM|<ref.wav>|<prompt text>|<lang>|<text>; "
                                            f"got {len(parts) + 1} parts, speaking the text as given",))
        ref, prompt, lang, body = (p.strip() for p in parts)
        return TextRequest(body, custom=(ref, prompt, lang.lower()))
    if name == "TRAINED":
        parts = rest.split("|", 5)
        if len(parts) != 6:
            note = ("VOICE:TRAINED needs VOICE:TRAINED|<gpt.ckpt>|<sovits.pth>|<ref.wav>|<prompt text>|<lang>|<text>; "
                    f"got {len(parts) + 1} parts, speaking the text as given")
            return TextRequest(text, notes=(note,))
        gpt, sovits, ref, prompt, lang, body = (p.strip() for p in parts)
        return TextRequest(body, trained=(gpt, sovits, ref, prompt, lang.lower()))
    return TextRequest(rest, voice_id=name)


def is_speakable(text: str) -> bool:
    return any(ch not in PUNCTUATION_ONLY for ch in text.strip())


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


