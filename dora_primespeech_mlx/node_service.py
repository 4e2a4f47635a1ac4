"""The dora-primespeech protocol over the engine, without Dora: config, payload parsing, handlers.

`node.py` feeds Dora events into `TTSService` and sends what it puts in its outbox. Keeping the
protocol here makes every input form testable with an injected send function (dora's MockNode
drops metadata) and keeps `dora` out of the engine.

Differences from dora-primespeech, on purpose (interface doc 7.3): JSON scalars never crash the node;
empty or punctuation-only text yields exactly one `segment_complete` (`empty`), not two; a switched
voice keeps its own language and speed unless the environment sets them; every voice shares the
loaded encoders instead of rebuilding the engine; `reset`/`cancel` really stop synthesis.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .options import AudioChunk, SynthesisCancelled, SynthesisOptions
from .voices import SUPPORTED_LANGS, Voice, VoiceRegistry, expand_path

logger = logging.getLogger(__name__)

NODE_NAME = "primespeech-tts"  # the `node` field of log messages, as primespeech writes it
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
# characters that alone make a text unspeakable (primespeech's list; " and ' are ASCII there)
PUNCTUATION_ONLY = set("。！？.!?,，、；：\"\"''（）【】《》\n\r\t ") | set("“”‘’")
# env vars that primespeech YAMLs set but this node does not need
UNNEEDED_ENV = ("USE_GPU", "DEVICE", "NUM_THREADS", "BATCH_SIZE", "TEXT_SPLIT_METHOD", "SPLIT_BUCKET",
                "ENABLE_INTERNAL_SEGMENTATION", "TTS_MAX_SEGMENT_LENGTH", "TTS_MIN_SEGMENT_LENGTH",
                "SAMPLE_RATE", "REPOSITORY", "GPT_MODEL_PATH", "SOVITS_MODEL_PATH", "REFERENCE_AUDIO_PATH")
UNSUPPORTED_LANGS = ("ja", "ko", "yue", "auto_yue", "all_ja", "all_ko", "all_yue")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")
SLOW_SEND_S = 0.05  # a Dora send slower than this is logged (DEBUG)  # models.t2s.PRECISIONS, without importing MLX

Send = Callable[[str, pa.Array, dict], None]


class TTSEngine(Protocol):
    """What the node needs from the engine (dora_primespeech_mlx.engine.Engine)."""

    registry: VoiceRegistry
    sample_rate: int

    def prepare_voice(self, voice: Voice) -> Any: ...

    def synthesize_stream(self, text: str, voice: Voice, options: SynthesisOptions, *,
                          streaming: bool = True,
                          is_cancelled: Callable[[], bool] | None = None) -> Iterator[AudioChunk]: ...

    def cancel(self) -> None: ...


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class NodeConfig:
    """Environment, read once (not at import time). Bad values fall back to defaults with a note."""

    voice_name: str = "Doubao"
    model_dir: Path = Path("~/.dora/models/primespeech").expanduser()
    use_ane: bool = False
    precision: str = "fp32"  # PRECISION: fp32 (default) | fp16 | bf16 | int8 (opt-in, docs/performance.md)
    text_lang: str | None = None
    prompt_text: str | None = None
    speed_factor: float | None = None
    fragment_interval: float | None = None
    return_fragment: bool = False
    top_k: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.35
    noise_scale: float = 0.5
    seed: int | None = 233333
    max_new_tokens: int | None = None
    log_level: str = "INFO"
    notes: tuple[str, ...] = ()  # what to log once at startup (bad values, unneeded variables)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeConfig:
        env = os.environ if env is None else env
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

        text_lang = get("TEXT_LANG", str.lower, None, lambda v: v in SUPPORTED_LANGS,
                        f"use one of {', '.join(SUPPORTED_LANGS)} (ja/ko/yue are not supported yet)")
        if env.get("PROMPT_LANG"):
            notes.append("PROMPT_LANG is taken from the voice registry; the variable is ignored")
        level = get("LOG_LEVEL", str.upper, "INFO", lambda v: v in LOG_LEVELS, "use DEBUG, INFO, WARNING or ERROR")
        for name in UNNEEDED_ENV:
            if name in env:
                notes.append(f"{name} is not needed by dora-primespeech-mlx and is ignored")
        model_dir = expand_path(env.get("PRIMESPEECH_MODEL_DIR") or "~/.dora/models/primespeech")
        return cls(
            voice_name=(env.get("VOICE_NAME") or "Doubao").strip(),
            model_dir=model_dir,
            use_ane=get("USE_ANE", parse_bool, False),
            precision=get("PRECISION", str.lower, "fp32", lambda v: v in PRECISION_CHOICES,
                          f"use one of {', '.join(PRECISION_CHOICES)}"),
            text_lang=text_lang,
            prompt_text=env.get("PROMPT_TEXT") or None,
            speed_factor=get("SPEED_FACTOR", float, None, lambda v: 0.25 <= v <= 4.0, "use 0.25-4.0"),
            fragment_interval=get("FRAGMENT_INTERVAL", float, None, lambda v: 0 <= v <= 10, "use 0-10 seconds"),
            return_fragment=get("RETURN_FRAGMENT", parse_bool, False),
            top_k=get("TOP_K", int, 5, lambda v: v >= 1, "use an integer >= 1"),
            top_p=get("TOP_P", float, 1.0, lambda v: 0 < v <= 1, "use (0, 1]"),
            temperature=get("TEMPERATURE", float, 1.0, lambda v: v > 0, "use > 0"),
            repetition_penalty=get("REPETITION_PENALTY", float, 1.35, lambda v: v > 0, "use > 0"),
            noise_scale=get("NOISE_SCALE", float, 0.5, lambda v: v >= 0, "use >= 0"),
            seed=get("SEED", int, 233333),
            max_new_tokens=get("MAX_NEW_TOKENS", int, None, lambda v: v >= 1, "use an integer >= 1"),
            log_level=level,
            notes=tuple(notes),
        )

    def options_for(self, voice: Voice) -> SynthesisOptions:
        """Options for one request: the environment wins, else the voice's own language and speed."""
        return SynthesisOptions(
            top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
            repetition_penalty=self.repetition_penalty, noise_scale=self.noise_scale,
            speed=self.speed_factor if self.speed_factor is not None else voice.speed_factor,
            seed=self.seed, fragment_interval=self.fragment_interval,
            text_lang=self.text_lang or voice.text_lang, max_new_tokens=self.max_new_tokens,
        )


# ----------------------------------------------------------------------------------- payload


@dataclass(frozen=True)
class TextRequest:
    """A parsed `text` input."""

    text: str
    voice_id: str | None = None  # VOICE:<id>|...
    custom: tuple[str, str, str] | None = None  # VOICE:CUSTOM|ref|prompt|lang|... -> (ref, prompt, lang)
    notes: tuple[str, ...] = ()


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
    """Unwrap `{"prompt": ...}` JSON and a `VOICE:` prefix. Other JSON is plain text."""
    text = raw
    stripped = raw.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            obj = None
        if isinstance(obj, dict) and "prompt" in obj:
            text = "" if obj["prompt"] is None else str(obj["prompt"])
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
    return TextRequest(rest, voice_id=name)


def is_speakable(text: str) -> bool:
    return any(ch not in PUNCTUATION_ONLY for ch in text.strip())


# ----------------------------------------------------------------------------------- service


@dataclass
class _Job:
    request: TextRequest
    metadata: dict
    received: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


class TTSService:
    """Turns `text`/`control` events into `audio`, `segment_complete`, `status` and `log` outputs.

    One thread owns all MLX work (the engine's threading rule, engine.py): the `mlx-owner` thread
    builds the engine, prepares the startup voice, warms up, then runs every request for the node's
    whole life. The thread that talks to Dora only parses payloads, queues jobs, sets cancel flags and
    sends what the owner put in `outbox` (`drain`): it never touches an MLX array, so `control` and
    STOP are read while the engine loads or synthesises.
    """

    def __init__(self, config: NodeConfig, engine_factory: Callable[[NodeConfig], TTSEngine]):
        self.config = config
        self.outbox: queue.Queue[tuple[str, pa.Array, dict]] = queue.Queue()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[_Job] = []
        self._prepared: dict[str, Any] = {}
        self.stats = {"syntheses": 0, "audio_seconds": 0.0, "errors": 0, "cancelled": 0}
        self.engine: TTSEngine | None = None
        self.init_error: str | None = None
        self._ready = threading.Event()
        for note in config.notes:
            self.log("WARNING", note)
        self._worker = threading.Thread(target=self._own_mlx, args=(engine_factory,), name="mlx-owner",
                                        daemon=True)
        self._worker.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine is loaded and warmed up, or failed to (`init_error`)."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ---- outputs

    def log(self, level: str, message: str, metadata: dict | None = None) -> None:
        getattr(logger, level.lower(), logger.info)(message)
        if LOG_LEVELS[level] < LOG_LEVELS[self.config.log_level]:
            return
        body = json.dumps({"node": NODE_NAME, "level": level, "message": message}, ensure_ascii=False)
        meta = {"node": NODE_NAME, "level": level, "message": message}
        if metadata:
            meta.update({k: v for k, v in metadata.items() if k in ("question_id", "session_status")})
        self.outbox.put(("log", pa.array([body]), meta))

    def status(self, state: str) -> None:
        self.outbox.put(("status", pa.array([state]), {"status": state}))

    def _complete(self, status: str, metadata: dict, **extra: Any) -> None:
        self.outbox.put(("segment_complete", pa.array([status]), {**metadata, **extra}))

    def drain(self, send: Send) -> int:
        """Send everything queued so far; returns how many messages went out."""
        n = 0
        while True:
            try:
                output_id, data, metadata = self.outbox.get_nowait()
            except queue.Empty:
                return n
            t0 = time.perf_counter()
            send(output_id, data, metadata)
            n += 1
            spent = time.perf_counter() - t0
            if spent > SLOW_SEND_S:
                self.log("DEBUG", f"sending {output_id!r} took {spent:.3f} s")

    # ---- engine

    def _start_engine(self, factory: Callable[[NodeConfig], TTSEngine]) -> None:
        """Build the engine, prepare the startup voice and warm up: on the owner thread."""
        t0 = time.perf_counter()
        try:
            self.engine = factory(self.config)
            backend = getattr(self.engine, "backend", None)
            if backend:
                self.log("INFO", f"MLX: {backend}")
            voice = self._startup_voice()
            self._prepare(voice)
            warm_up = getattr(self.engine, "warm_up", None)  # compiles the GPT step on a GPU
            if warm_up is not None:
                spent = warm_up(voice, self.config.options_for(voice), streaming=self.config.return_fragment)
                if isinstance(spent, dict) and any(spent.values()):
                    self.log("INFO", "warm-up: " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
        except Exception as exc:  # noqa: BLE001 - the node stays alive and reports the cause
            self.engine = None
            self.init_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ImportError):
                fix = "the installation is incomplete: reinstall dora-primespeech-mlx in the node's Python"
            else:
                fix = (f"check PRIMESPEECH_MODEL_DIR={self.config.model_dir} (it must contain moyoyo/ with "
                       f"the voice files) and VOICE_NAME={self.config.voice_name!r}")
            self.log("ERROR", f"engine initialisation failed: {self.init_error}; {fix}")
            self.status("error")
            return
        self.log("INFO", f"ready: voice {voice.id!r} prepared and warmed up in {time.perf_counter() - t0:.2f} s")
        self.status("ready")

    def _startup_voice(self) -> Voice:
        assert self.engine is not None
        registry = self.engine.registry
        name = self.config.voice_name
        if name not in registry:
            self.log("ERROR", f"VOICE_NAME={name!r} is not a known voice; using 'Doubao'. "
                              f"Known voices: {', '.join(registry.ids())}")
            name = "Doubao"
        voice = registry.get(name)
        if self.config.prompt_text:
            from dataclasses import replace

            voice = replace(voice, prompt_text=self.config.prompt_text)  # a copy: the registry stays as it is
        self._startup = voice
        return voice

    def _prepare(self, voice: Voice) -> Any:
        key = f"{voice.id}|{voice.reference_audio}|{voice.prompt_text}|{voice.prompt_lang}"
        if key not in self._prepared:
            assert self.engine is not None
            self._prepared[key] = self.engine.prepare_voice(voice)
        return self._prepared[key]

    # ---- inputs

    def handle_text(self, value: Any, metadata: Mapping | None) -> None:
        metadata = dict(metadata or {})
        passthrough = {"question_id": metadata.get("question_id", "default"),
                       "session_status": metadata.get("session_status", "unknown")}
        if not isinstance(passthrough["question_id"], (str, int, float, bool)):
            passthrough["question_id"] = str(passthrough["question_id"])
        if not isinstance(passthrough["session_status"], str):
            passthrough["session_status"] = str(passthrough["session_status"])
        if passthrough["session_status"] in ("completed", "finished", "ended", "final"):
            self.log("INFO", f"session {passthrough['session_status']}", passthrough)
        request = parse_text_payload(arrow_text(value))
        for note in request.notes:
            self.log("WARNING", note, passthrough)
        if not is_speakable(request.text):
            # one completion (primespeech sent two: skipped + empty); no audio
            self._complete("empty", passthrough)
            return
        if self._ready.is_set() and self.engine is None:
            self.stats["errors"] += 1
            self._complete("error", passthrough, session_status="error", error_stage="init",
                           error=f"engine not initialised: {self.init_error}")
            return
        job = _Job(request, passthrough)  # the voice is resolved on the owner thread, once it is ready
        with self._lock:
            self._pending.append(job)
        self._jobs.put(job)

    def _resolve_voice(self, request: TextRequest, metadata: dict) -> Voice:
        assert self.engine is not None
        registry = self.engine.registry
        if request.custom is not None:
            ref, prompt, lang = request.custom
            voice = registry.custom(ref, prompt, lang)
            if not voice.reference_audio.is_file():
                raise FileNotFoundError(f"VOICE:CUSTOM reference clip {voice.reference_audio} does not exist; "
                                        "send an absolute path to a 3-10 s WAV file")
            return voice
        if request.voice_id is not None:
            if request.voice_id in registry:
                return registry.get(request.voice_id)
            self.log("WARNING", f"unknown voice {request.voice_id!r}; using the startup voice "
                                f"{self._startup.id!r}", metadata)
        return self._startup

    def handle_control(self, value: Any) -> None:
        command = arrow_text(value).strip()
        lowered = command.lower()
        if lowered in ("reset", "cancel"):
            n = self.cancel_all()
            self.log("INFO", f"{lowered}: cancelled {n} request(s)")
        elif lowered == "stats":
            s = self.stats
            self.log("INFO", f"stats: {s['syntheses']} syntheses, {s['audio_seconds']:.2f} s of audio, "
                             f"{s['errors']} errors, {s['cancelled']} cancelled")
        elif lowered == "list_voices":  # the registry is plain Python: safe off the owner thread
            ids = self.engine.registry.ids() if self.engine is not None else VoiceRegistry(self.config.model_dir).ids()
            self.log("INFO", "voices: " + ", ".join(ids))
        else:
            self.log("WARNING", f"unknown control command {command!r}; use reset, cancel, stats or list_voices")

    def cancel_all(self) -> int:
        """Mark every running and queued request cancelled (plain flags: any thread)."""
        with self._lock:
            jobs = list(self._pending)
            for job in jobs:
                job.cancelled = True
        if self.engine is not None and jobs:
            self.engine.cancel()
        return len(jobs)

    # ---- the MLX owner thread

    def _own_mlx(self, factory: Callable[[NodeConfig], TTSEngine]) -> None:
        try:
            self._start_engine(factory)
        finally:
            self._ready.set()
        self._work()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run_job(job)
            except Exception as exc:  # noqa: BLE001 - the owner thread must outlive any request
                self.stats["errors"] += 1
                logger.exception("request failed outside synthesis")
                self._complete("error", job.metadata, session_status="error", error_stage="node",
                               error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._pending.remove(job)
                    idle = not self._pending
                if idle:
                    self.status("idle")

    def _cancelled(self, job: _Job) -> None:
        self.stats["cancelled"] += 1
        self._complete("cancelled", job.metadata)

    def _run_job(self, job: _Job) -> None:
        if job.cancelled:
            return self._cancelled(job)
        if self.engine is None:
            self.stats["errors"] += 1
            self._complete("error", job.metadata, session_status="error", error_stage="init",
                           error=f"engine not initialised: {self.init_error}")
            return None
        try:
            voice = self._resolve_voice(job.request, job.metadata)
        except (FileNotFoundError, ValueError) as exc:
            self.stats["errors"] += 1
            self._complete("error", job.metadata, session_status="error", error_stage="voice", error=str(exc))
            return None
        self.status("busy")
        options = self.config.options_for(voice)
        streaming = self.config.return_fragment
        pieces: list[np.ndarray] = []
        first_chunk_s = None
        spent: dict[str, float] = {}
        try:
            self._prepare(voice)
            if job.cancelled:  # a reset during voice preparation
                raise SynthesisCancelled()
            index = 0
            for chunk in self.engine.synthesize_stream(job.request.text, voice, options, streaming=streaming,
                                                       is_cancelled=lambda: job.cancelled):
                if job.cancelled:
                    raise SynthesisCancelled()
                if first_chunk_s is None:
                    first_chunk_s = time.perf_counter() - job.received
                for key in ("frontend_s", "frontend_next_s", "t2s_s", "sovits_s", "tokens"):
                    spent[key] = spent.get(key, 0.0) + float(chunk.timings.get(key, 0.0))
                audio = np.asarray(chunk.audio, dtype=np.float32)
                if streaming:
                    self._send_audio(audio, chunk.sample_rate, job.metadata, segment_index=index,
                                     is_final=bool(chunk.is_final))
                    index += 1
                else:
                    pieces.append(audio)
            if job.cancelled:
                raise SynthesisCancelled()
        except SynthesisCancelled:
            return self._cancelled(job)
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the node
            if job.cancelled:  # whatever a cancelled synthesis raised on its way out
                return self._cancelled(job)
            self.stats["errors"] += 1
            self.log("ERROR", f"synthesis failed for {job.request.text[:40]!r}: {type(exc).__name__}: {exc}",
                     job.metadata)
            self._complete("error", job.metadata, session_status="error", error_stage="synthesis",
                           error=f"{type(exc).__name__}: {exc}")
            return None
        if not streaming:
            audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            self._send_audio(audio, self.engine.sample_rate, job.metadata)
        total = time.perf_counter() - job.received
        self.stats["syntheses"] += 1
        self.log("DEBUG", f"synthesised {job.request.text[:40]!r} in {total:.3f} s (first audio after "
                          f"{first_chunk_s or total:.3f} s; text+BERT {spent.get('frontend_s', 0) + spent.get('frontend_next_s', 0):.3f} s, "
                          f"GPT {spent.get('t2s_s', 0):.3f} s for {int(spent.get('tokens', 0))} tokens, "
                          f"SoVITS {spent.get('sovits_s', 0):.3f} s)", job.metadata)
        self._complete("completed", job.metadata)
        return None

    def _send_audio(self, audio: np.ndarray, sample_rate: int, metadata: dict, **extra: Any) -> None:
        duration = float(len(audio)) / float(sample_rate)
        self.stats["audio_seconds"] += duration
        meta = {**metadata, "sample_rate": int(sample_rate), "duration": duration, **extra}
        # list<float32> of length 1: what primespeech sends and Python consumers index with [0]
        self.outbox.put(("audio", pa.array([audio], type=pa.list_(pa.float32())), meta))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is pending (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.cancel_all()
        self._jobs.put(None)
        self._worker.join()
