"""`POST /v1/audio/speech` bodies: OpenAI's fields plus this engine's extensions, checked into a
`SpeechRequest` (pure Python; every bad value is an ApiError naming the field and the fix)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..constants import MAX_DECODE_STEPS
from ..node_config import SEED_MAX
from ..options import SynthesisOptions
from ..voices import SUPPORTED_LANGS
from .encoding import FORMATS
from .errors import ApiError

MAX_INPUT_CHARS = 4096  # OpenAI's limit for `input`
SPEED_RANGE = (0.25, 4.0)  # OpenAI's range for `speed`
DEFAULT_FORMAT = "mp3"  # OpenAI's default
IGNORED = ("model", "instructions")  # any value accepted: there is one model, and it takes no instructions


@dataclass(frozen=True)
class SpeechRequest:
    input: str
    voice: str | None  # None: the default voice
    response_format: str
    speed: float  # multiplies the voice's own speed factor
    options: SynthesisOptions  # speed is set once the voice is known (`options_for`)

    def options_for(self, voice_speed: float) -> SynthesisOptions:
        low, high = SPEED_RANGE
        return replace(self.options, speed=min(high, max(low, voice_speed * self.speed)))


def _number(body: dict, name: str, check, hint: str, *, integer: bool = False) -> Any:
    value = body[name]
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok or (not integer and not math.isfinite(value)) or not check(value):
        raise ApiError(400, f"{name}={str(value)[:40]!r} is invalid: {hint}", name, "invalid_value")
    return value


def parse_speech(body: Any, base: SynthesisOptions, *, max_chars: int = MAX_INPUT_CHARS,
                 max_tokens_cap: int | None = None) -> SpeechRequest:
    """`base`: the server's options (from the environment). `max_tokens_cap`: the server's MAX_NEW_TOKENS,
    which a request may lower but not raise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object such as {\"input\": \"Hello\", \"voice\": \"Doubao\"}")
    known = {"input", "voice", "response_format", "speed", "stream_format", "text_lang", "top_k", "top_p",
             "temperature", "repetition_penalty", "seed", "noise_scale", "max_new_tokens", *IGNORED}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0][:40]!r}: the fields are {', '.join(sorted(known))}",
                       unknown[0][:40], "unknown_field")
    text = body.get("input")
    if text is not None and not isinstance(text, str):
        raise ApiError(400, f"input must be a string (the text to speak), got {type(text).__name__}", "input",
                       "invalid_type")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, f"input is required: the text to speak, 1-{max_chars} characters", "input",
                       "empty_input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800) in the JSON
        raise ApiError(400, "input is not valid Unicode (it holds a lone surrogate): send UTF-8 text", "input",
                       "invalid_value") from None
    if len(text) > max_chars:
        raise ApiError(400, f"input has {len(text)} characters; the limit is {max_chars}: split the text into "
                            "several requests", "input", "input_too_long")
    voice = body.get("voice")
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):  # OpenAI's custom-voice form {"id": ...}
        voice = voice["id"]
    if voice is not None and (not isinstance(voice, str) or not voice.strip()):
        raise ApiError(400, "voice must be a voice id (GET /v1/audio/voices lists them)", "voice", "invalid_value")
    fmt = body.get("response_format", DEFAULT_FORMAT)
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ApiError(400, f"response_format {str(fmt)[:20]!r} is not supported: use one of {', '.join(FORMATS)}",
                       "response_format", "unsupported_format")
    stream_format = body.get("stream_format", "audio")
    if stream_format != "audio":
        raise ApiError(400, f"stream_format {str(stream_format)[:20]!r} is not supported: only \"audio\" (pcm and "
                            "wav stream as raw audio)", "stream_format", "unsupported_format")
    speed = 1.0
    if body.get("speed") is not None:
        low, high = SPEED_RANGE
        speed = float(_number(body, "speed", lambda v: low <= v <= high, f"use {low:g}-{high:g} (1 is the voice's "
                                                                           "own pace)"))
    changes: dict[str, Any] = {}
    if body.get("text_lang") is not None:
        lang = body["text_lang"]
        if not isinstance(lang, str) or lang.lower() not in SUPPORTED_LANGS:
            raise ApiError(400, f"text_lang {str(lang)[:20]!r} is not supported: use one of "
                                f"{', '.join(SUPPORTED_LANGS)}", "text_lang", "invalid_value")
        changes["text_lang"] = lang.lower()
    checks = {
        "top_k": (lambda v: 1 <= v <= 1025, "an integer 1-1025", True),
        "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]", False),
        "temperature": (lambda v: 0 < v <= 10, "a number in (0, 10]", False),
        "repetition_penalty": (lambda v: 0 < v <= 10, "a number in (0, 10]", False),
        "noise_scale": (lambda v: 0 <= v <= 10, "a number in [0, 10]", False),
        "max_new_tokens": (lambda v: 1 <= v <= (max_tokens_cap or MAX_DECODE_STEPS),
                           f"an integer 1-{max_tokens_cap or MAX_DECODE_STEPS} (this server's cap)", True),
    }
    for name, (check, hint, integer) in checks.items():
        if body.get(name) is not None:
            changes[name] = _number(body, name, check, f"use {hint}", integer=integer)
    if "seed" in body:
        seed = body["seed"]
        if seed is not None:
            seed = _number(body, "seed", lambda v: -1 <= v <= SEED_MAX, f"use 0-{SEED_MAX}, or -1 / null for a "
                                                                        "random seed", integer=True)
        changes["seed"] = None if seed in (None, -1) else seed
    options = replace(base, **changes)
    if options.max_new_tokens is None and max_tokens_cap is not None:
        options = replace(options, max_new_tokens=max_tokens_cap)
    return SpeechRequest(text, voice.strip() if voice else None, fmt.lower(), speed, options)
