"""The node's environment, read once at start-up: every variable parsed, checked and, when bad, replaced
by its default with a note the node logs (a wrong value never stops the node)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import DEFAULT_MODEL_DIR, PRECISIONS
from .options import SynthesisOptions
from .voices import SUPPORTED_LANGS, expand_path

LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
# env vars that primespeech YAMLs set but this node does not need
UNNEEDED_ENV = ("USE_GPU", "DEVICE", "NUM_THREADS", "BATCH_SIZE", "TEXT_SPLIT_METHOD", "SPLIT_BUCKET",
                "ENABLE_INTERNAL_SEGMENTATION", "TTS_MAX_SEGMENT_LENGTH", "TTS_MIN_SEGMENT_LENGTH",
                "SAMPLE_RATE", "REPOSITORY", "GPT_MODEL_PATH", "SOVITS_MODEL_PATH", "REFERENCE_AUDIO_PATH",
                # dora-gpt-sovits-mlx's (mofa-fm): its own weight files and switches
                "GPT_SOVITS_MODEL_DIR", "T2S_WEIGHTS", "BERT_WEIGHTS", "BERT_TOKENIZER", "VITS_WEIGHTS",
                "HUBERT_WEIGHTS", "VITS_ONNX_PATH", "VITS_PRETRAINED_BASE", "CODES_PATH", "USE_MLX_VITS",
                "SYNTHESIS_TIMEOUT_SECS", "FRAGMENT_MIN_CHARS", "RUST_LOG")
UNSUPPORTED_LANGS = ("ja", "ko", "yue", "auto_yue", "all_ja", "all_ko", "all_yue")
SEED_MAX = 2**32 - 1  # GPT-SoVITS's seed range; -1 means a fresh random seed per request, as there


def parse_allowed_dirs(raw: str | None, notes: list[str]) -> tuple[Path, ...] | None:
    """ALLOWED_VOICE_DIRS: folders (os.pathsep-separated, `~`/`$VAR` expanded: the operator wrote them)
    that VOICE:CUSTOM/VOICE:TRAINED files must lie in, links resolved. Unset: any absolute path."""
    if raw is None or not raw.strip():
        return None
    folders = []
    for part in raw.split(os.pathsep):
        if not part.strip():
            continue
        folder = Path(os.path.realpath(expand_path(part.strip())))
        if not folder.is_dir():
            notes.append(f"ALLOWED_VOICE_DIRS: {part.strip()!r} is not a folder; payload files from it are refused")
        folders.append(folder)
    return tuple(folders)  # set but naming no folder: every payload file is refused


_DEFAULTS = SynthesisOptions()  # the engine's defaults are the node's: one place


@dataclass(frozen=True)
class NodeConfig:
    """Environment, read once (not at import time). Bad values fall back to defaults with a note."""

    voice_name: str = "Doubao"  # VOICE_NAME, else VOICE_CHARACTER (mofa-fm's Rust node), else Doubao
    voice_source: str = "default"  # which of them: "VOICE_NAME" | "VOICE_CHARACTER" | "default"
    model_dir: Path = Path(DEFAULT_MODEL_DIR).expanduser()
    voices_config: Path | None = None  # VOICES_CONFIG: dora-gpt-sovits-mlx's voices.json (characters)
    ref_audio: Path | None = None  # REF_AUDIO: the startup voice's reference clip
    ref_text: str | None = None  # REF_TEXT: its transcript (PROMPT_TEXT wins when both are set)
    allowed_voice_dirs: tuple[Path, ...] | None = None  # ALLOWED_VOICE_DIRS: payload files only from these
    use_ane: bool = False
    precision: str = "fp32"  # PRECISION: fp32 (default) | fp16 | bf16 | int8 (opt-in, docs/performance.md)
    text_lang: str | None = None
    prompt_text: str | None = None
    speed_factor: float | None = None
    fragment_interval: float | None = None
    return_fragment: bool = False
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    temperature: float = _DEFAULTS.temperature
    repetition_penalty: float = _DEFAULTS.repetition_penalty
    noise_scale: float = _DEFAULTS.noise_scale
    seed: int | None = _DEFAULTS.seed
    max_new_tokens: int | None = None
    log_level: str = "INFO"
    notes: tuple[str, ...] = ()  # what to log once at startup (bad values, unneeded variables)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeConfig:
        env = os.environ if env is None else env
        d = _DEFAULTS
        notes: list[str] = []

        def get(name: str, parse: Callable[[str], Any], default: Any, check=lambda v: True, hint: str = ""):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                value = parse(raw.strip())
                if not check(value):
                    raise ValueError
                return value
            except (ValueError, TypeError):
                notes.append(f"{name}={raw!r} is invalid{': ' + hint if hint else ''}; using {default!r}")
                return default

        def parse_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(s)

        def finite(s: str) -> float:  # "inf" and "nan" parse as floats but mean nothing here
            value = float(s)
            if not math.isfinite(value):
                raise ValueError(s)
            return value

        def parse_seed(s: str) -> int | None:
            value = int(s)
            return None if value == -1 else value  # -1: a random seed per request (GPT-SoVITS's meaning)

        text_lang = get("TEXT_LANG", str.lower, None, lambda v: v in SUPPORTED_LANGS,
                        f"use one of {', '.join(SUPPORTED_LANGS)} (ja/ko/yue are not supported yet)")
        if env.get("PROMPT_LANG"):
            notes.append("PROMPT_LANG is taken from the voice registry; the variable is ignored")
        level = get("LOG_LEVEL", str.upper, "INFO", lambda v: v in LOG_LEVELS, "use DEBUG, INFO, WARNING or ERROR")
        ignored = [name for name in UNNEEDED_ENV if name in env]
        if ignored:  # one line: mofa's YAMLs set many of them
            notes.append(f"not needed by dora-primespeech-mlx, ignored: {', '.join(ignored)}")
        model_dir = expand_path(env.get("PRIMESPEECH_MODEL_DIR") or DEFAULT_MODEL_DIR)
        voice_name, character = (env.get("VOICE_NAME") or "").strip(), (env.get("VOICE_CHARACTER") or "").strip()
        if voice_name and character:
            notes.append(f"VOICE_NAME={voice_name!r} and VOICE_CHARACTER={character!r} are both set; "
                         "VOICE_NAME wins")
        source = "VOICE_NAME" if voice_name else "VOICE_CHARACTER" if character else "default"
        prompt_text = env.get("PROMPT_TEXT") or None
        ref_text = (env.get("REF_TEXT") or "").strip() or None
        if prompt_text and ref_text and prompt_text.strip() != ref_text:
            notes.append("PROMPT_TEXT and REF_TEXT are both set; PROMPT_TEXT wins")
        allowed_dirs = parse_allowed_dirs(env.get("ALLOWED_VOICE_DIRS"), notes)
        return cls(
            voice_name=voice_name or character or "Doubao",
            voice_source=source,
            model_dir=model_dir,
            voices_config=expand_path(env["VOICES_CONFIG"]) if (env.get("VOICES_CONFIG") or "").strip() else None,
            ref_audio=expand_path(env["REF_AUDIO"].strip()) if (env.get("REF_AUDIO") or "").strip() else None,
            ref_text=ref_text,
            allowed_voice_dirs=allowed_dirs,
            use_ane=get("USE_ANE", parse_bool, False),
            precision=get("PRECISION", str.lower, "fp32", lambda v: v in PRECISIONS,
                          f"use one of {', '.join(PRECISIONS)}"),
            text_lang=text_lang,
            prompt_text=prompt_text,
            speed_factor=get("SPEED_FACTOR", finite, None, lambda v: 0.25 <= v <= 4.0, "use 0.25-4.0"),
            fragment_interval=get("FRAGMENT_INTERVAL", finite, None, lambda v: 0 <= v <= 10, "use 0-10 seconds"),
            return_fragment=get("RETURN_FRAGMENT", parse_bool, False),
            top_k=get("TOP_K", int, d.top_k, lambda v: v >= 1, "use an integer >= 1"),
            top_p=get("TOP_P", finite, d.top_p, lambda v: 0 < v <= 1, "use (0, 1]"),
            temperature=get("TEMPERATURE", finite, d.temperature, lambda v: v > 0, "use a finite number > 0"),
            repetition_penalty=get("REPETITION_PENALTY", finite, d.repetition_penalty, lambda v: v > 0,
                                   "use a finite number > 0"),
            noise_scale=get("NOISE_SCALE", finite, d.noise_scale, lambda v: v >= 0, "use a finite number >= 0"),
            seed=get("SEED", parse_seed, d.seed, lambda v: v is None or 0 <= v <= SEED_MAX,
                     f"use 0-{SEED_MAX}, or -1 for a random seed per request"),
            max_new_tokens=get("MAX_NEW_TOKENS", int, None, lambda v: v >= 1, "use an integer >= 1"),
            log_level=level,
            notes=tuple(notes),
        )

    @property
    def options(self) -> SynthesisOptions:
        """Every request's options. Unset SPEED_FACTOR / TEXT_LANG / FRAGMENT_INTERVAL stay None: the
        engine fills them from the voice (the one place option defaults are resolved)."""
        return SynthesisOptions(
            top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
            repetition_penalty=self.repetition_penalty, noise_scale=self.noise_scale,
            speed=self.speed_factor, seed=self.seed, fragment_interval=self.fragment_interval,
            text_lang=self.text_lang, max_new_tokens=self.max_new_tokens,
        )


