"""The dora-primespeech protocol over the engine, without Dora: config, payload parsing, handlers.

`node.py` feeds Dora events into `TTSService` and sends what it puts in its outbox. Keeping the
protocol here makes every input form testable with an injected send function (dora's MockNode
drops metadata) and keeps `dora` out of the engine.

Differences from dora-primespeech, on purpose (interface doc 7.3): JSON scalars never crash the node;
empty or punctuation-only text yields exactly one `segment_complete` (`empty`), not two; a switched
voice keeps its own language and speed unless the environment sets them; every voice shares the
loaded encoders instead of rebuilding the engine; `reset`/`cancel` really stop synthesis; a JSON
object without "prompt" speaks nothing; a text with characters but no phones (emoji, symbols) gets
a short silent `audio` and `segment_complete: empty` (primespeech: 1 s of silence, `completed`).

Also read: mofa-studio's Rust node `dora-gpt-sovits-mlx`'s configuration (`VOICE_CHARACTER`,
`VOICES_CONFIG`, `REF_AUDIO`, `REF_TEXT`; voices.py) and Moxin-Voice's `VOICE:TRAINED|...`.
Payloads may come from an LLM: their paths are never expanded, and every outgoing string is valid
UTF-8 with no environment value in a request's `error` beyond what the request sent.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .node_config import LOG_LEVELS, NodeConfig
from .node_payload import TextRequest, arrow_text, is_file, is_speakable, parse_text_payload, valid_unicode
from .options import AudioChunk, NothingToSpeak, SynthesisCancelled, SynthesisOptions, join_audio
from .voices import (
    CharacterTable,
    Voice,
    VoiceRegistry,
    find_characters_file,
    known_names,
    payload_file,
    resolve_voice,
    shorten,
)

logger = logging.getLogger(__name__)

NODE_NAME = "primespeech-tts"  # the `node` field of log messages, as primespeech writes it

SLOW_SEND_S = 0.05  # a Dora send slower than this is logged (DEBUG)
NO_PHONES_SILENCE_S = 0.2  # silent audio for a text with characters but nothing to speak

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
        self._idle = threading.Condition(self._lock)  # notified when the last pending request ends
        self._pending: list[_Job] = []
        self.stats = {"syntheses": 0, "audio_seconds": 0.0, "errors": 0, "cancelled": 0}
        self.engine: TTSEngine | None = None
        self.init_error: str | None = None
        self._characters: CharacterTable | None = None  # dora-gpt-sovits-mlx's voices.json, read at start
        self._ready = threading.Event()
        self.owner_error: str | None = None  # set if the MLX owner thread ever dies
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
        message = valid_unicode(message)
        getattr(logger, level.lower(), logger.info)(message)  # stderr: full paths, for the operator
        if LOG_LEVELS[level] < LOG_LEVELS[self.config.log_level]:
            return
        if metadata is not None:  # about a request: no local paths on the output (see _redact)
            message = self._redact(message)
        body = json.dumps({"node": NODE_NAME, "level": level, "message": message}, ensure_ascii=False)
        meta = {"node": NODE_NAME, "level": level, "message": message}
        if metadata:
            meta.update({k: v for k, v in metadata.items() if k in ("question_id", "session_status")})
        self.outbox.put(("log", pa.array([body]), meta))

    def status(self, state: str) -> None:
        self.outbox.put(("status", pa.array([state]), {"status": state}))

    def _complete(self, status: str, metadata: dict, **extra: Any) -> None:
        if "error" in extra:  # goes back towards whoever sent the text: no paths of this machine
            extra["error"] = self._redact(valid_unicode(str(extra["error"])))
        self.outbox.put(("segment_complete", pa.array([status]), {**metadata, **extra}))

    def _redact(self, message: str) -> str:
        """`message` with the model directory and the home directory written as `$PRIMESPEECH_MODEL_DIR`
        and `~`: an engine error may name files the request never mentioned."""
        for path, name in ((str(self.config.model_dir), "$PRIMESPEECH_MODEL_DIR"), (os.path.expanduser("~"), "~")):
            if len(path) > 1:  # whole path components only: /data/m is not redacted inside /data/mine.wav
                message = re.sub(re.escape(path.rstrip("/")) + r"(?![\w.-])", lambda _: name, message)
        return message

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
            self._report_frontend()
            self._load_characters()
            voice = self._startup_voice()
            self._prepare(voice)
            warm_up = getattr(self.engine, "warm_up", None)  # compiles the GPT step on a GPU
            if warm_up is not None:
                spent = warm_up(voice, self.config.options, streaming=self.config.return_fragment)
                if isinstance(spent, dict) and any(spent.values()):
                    self.log("INFO", "warm-up: " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
        except Exception as exc:  # noqa: BLE001 - the node stays alive and reports the cause
            self.engine = None
            self.init_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ImportError):
                fix = "the installation is incomplete: reinstall dora-primespeech-mlx in the node's Python"
            else:
                fix = (f"check PRIMESPEECH_MODEL_DIR={self.config.model_dir} (it must contain moyoyo/ with "
                       f"the voice files) and {self.config.voice_source if self.config.voice_source != 'default' else 'VOICE_NAME'}"
                       f"={self.config.voice_name!r}")
            self.log("ERROR", f"engine initialisation failed: {self.init_error}; {fix}")
            self.status("error")
            return
        self.log("INFO", f"ready: voice {voice.id!r} prepared and warmed up in {time.perf_counter() - t0:.2f} s")
        self.status("ready")

    def _report_frontend(self) -> None:
        """Voices files the registry skipped, and whether Chinese polyphones use G2PW: on `log`."""
        assert self.engine is not None
        for warning in getattr(self.engine.registry, "warnings", ()):
            self.log("WARNING", warning)
        from .text.g2pw import g2pw_status

        state = g2pw_status()  # set by the engine's configure_g2pw; None if it never ran
        if state is not None:
            self.log(*state)

    def _load_characters(self) -> None:
        """dora-gpt-sovits-mlx's voices.json (VOICES_CONFIG or the default places), if any."""
        table, warnings = find_characters_file(self.config.model_dir, self.config.voices_config)
        for warning in warnings:
            self.log("WARNING", warning)
        if table is not None:
            self.log("INFO", f"voice characters from {table.path}: {', '.join(table.ids()) or 'none'}")
        self._characters = table

    def _startup_voice(self) -> Voice:
        """VOICE_NAME, else VOICE_CHARACTER, else Doubao; then REF_AUDIO / REF_TEXT / PROMPT_TEXT."""
        from dataclasses import replace

        assert self.engine is not None
        registry = self.engine.registry
        name, source = self.config.voice_name, self.config.voice_source
        voice, how = registry.get("Doubao"), "the default voice"
        if source != "default":
            found = resolve_voice(name, registry, self._characters)
            if found is not None and found.voice is not None and found.zero_shot \
                    and not is_file(found.voice.reference_audio):
                self.log("WARNING", f"{source}={name!r}: {found.how}, but its reference clip "
                                    f"{found.voice.reference_audio} does not exist; using 'Doubao'")
            elif found is not None and found.voice is not None:
                voice, how = found.voice, f"{source}={name!r}: {found.how}"
            else:
                why = (found.problem if found is not None and found.problem else "is not a known voice") + \
                    f"; using 'Doubao'. Known voices: {', '.join(known_names(registry, self._characters))}"
                # VOICE_NAME is primespeech's own variable: a wrong one is an error, as it was
                self.log("ERROR" if source == "VOICE_NAME" else "WARNING", f"{source}={name!r} {why}")
            if voice.id == "Doubao" and how == "the default voice":
                how = f"instead of {source}={name!r}"
        prompt_text = self.config.prompt_text
        if self.config.ref_audio is not None:
            if is_file(self.config.ref_audio):
                voice = replace(voice, reference_audio=self.config.ref_audio)
                how += f"; reference clip from REF_AUDIO={self.config.ref_audio}"
                prompt_text = prompt_text or self.config.ref_text
                if prompt_text is None:
                    self.log("WARNING", "REF_AUDIO is set without REF_TEXT (or PROMPT_TEXT): the voice's own "
                                        "transcript is kept, and it must be what the clip says")
            else:
                self.log("WARNING", f"REF_AUDIO={self.config.ref_audio} is not a file; the voice keeps its own "
                                    "reference clip (and REF_TEXT is ignored)")
        else:
            prompt_text = prompt_text or self.config.ref_text
        if prompt_text:
            voice = replace(voice, prompt_text=prompt_text)  # a copy: the registry stays as it is
        self.log("INFO", f"startup voice {voice.id!r} ({how})")
        self._startup = voice
        return voice

    def _prepare(self, voice: Voice) -> Any:
        assert self.engine is not None
        return self.engine.prepare_voice(voice)  # the engine keeps prepared voices (bounded LRU)

    # ---- inputs

    def handle_text(self, value: Any, metadata: Mapping | None) -> None:
        metadata = dict(metadata or {})
        passthrough = {"question_id": metadata.get("question_id", "default"),
                       "session_status": metadata.get("session_status", "unknown")}
        if not isinstance(passthrough["question_id"], (str, int, float, bool)):
            passthrough["question_id"] = str(passthrough["question_id"])
        if not isinstance(passthrough["session_status"], str):
            passthrough["session_status"] = str(passthrough["session_status"])
        for key, item in passthrough.items():
            if isinstance(item, str):
                passthrough[key] = valid_unicode(item)
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
        """The request's voice, on the owner thread. Payload paths are checked here (literal, absolute,
        existing files); a bad one raises ValueError/FileNotFoundError naming only what was sent."""
        assert self.engine is not None
        registry = self.engine.registry
        allowed = self.config.allowed_voice_dirs
        if request.custom is not None:
            ref, prompt, lang = request.custom
            return registry.custom(payload_file(ref, "VOICE:CUSTOM reference clip", allowed_dirs=allowed),
                                   prompt, lang)
        if request.trained is not None:
            gpt, sovits, ref, prompt, lang = request.trained
            return registry.trained(payload_file(gpt, "VOICE:TRAINED GPT weights", (".ckpt",), allowed),
                                    payload_file(sovits, "VOICE:TRAINED SoVITS weights", (".pth",), allowed),
                                    payload_file(ref, "VOICE:TRAINED reference clip", allowed_dirs=allowed),
                                    prompt, lang)
        if request.voice_id is not None:
            if request.voice_id in registry:
                return registry.get(request.voice_id)
            found = resolve_voice(request.voice_id, registry, self._characters)
            if found is not None and found.voice is not None:
                if found.zero_shot and not is_file(found.voice.reference_audio):
                    logger.warning("voice %r: reference clip %s is missing", request.voice_id,
                                   found.voice.reference_audio)
                    raise FileNotFoundError(f"voice {shorten(request.voice_id)!r}: the reference clip its voices "
                                            "file names does not exist (the node's stderr names it)")
                return found.voice
            shown = shorten(request.voice_id, 80)
            what = f"voice {shown!r} {found.problem}" if found is not None and found.problem else f"unknown voice {shown!r}"
            self.log("WARNING", f"{what}; using the startup voice {self._startup.id!r}", metadata)
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
            characters = self._characters
            extra = f"; characters of {characters.path}: {', '.join(characters.ids())}" if characters else ""
            self.log("INFO", "voices: " + ", ".join(ids) + extra)
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
            try:
                self._start_engine(factory)
            finally:
                self._ready.set()
            self._work()
        except BaseException as exc:  # the owner never ends by error; say so loudly if it does anyway
            self.owner_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the MLX owner thread died")
            raise

    @property
    def owner_alive(self) -> bool:
        """False once the MLX owner thread has died: its MLX state cannot move to another thread, so
        the adapter must end the process (node.run exits non-zero)."""
        return self.owner_error is None and self._worker.is_alive()

    def fail_pending(self, reason: str) -> int:
        """Answer every request still pending with `error` (the owner thread is gone)."""
        with self._lock:
            jobs, self._pending = list(self._pending), []
            self._idle.notify_all()
        for job in jobs:
            self._complete("error", job.metadata, session_status="error", error_stage="node", error=reason)
        return len(jobs)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run_job(job)
            except BaseException as exc:  # noqa: BLE001 - the owner thread must outlive any request
                self.stats["errors"] += 1
                logger.exception("request failed outside synthesis")
                self._complete("error", job.metadata, session_status="error", error_stage="node",
                               error=f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, Exception):
                    self.owner_error = f"{type(exc).__name__}: {exc}"  # before the job leaves `_pending`
                    raise  # SystemExit, KeyboardInterrupt: the thread ends (node.run exits non-zero)
            finally:
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)
                    idle = not self._pending
                    if idle:
                        self._idle.notify_all()
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
        except (OSError, ValueError) as exc:
            self.stats["errors"] += 1
            self._complete("error", job.metadata, session_status="error", error_stage="voice", error=str(exc))
            return None
        options = self.config.options
        self.status("busy")
        streaming = self.config.return_fragment
        chunks: list[AudioChunk] = []
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
                for note in getattr(chunk, "notes", ()):  # a skipped sentence, a cut piece
                    self.log("WARNING", note, job.metadata)
                if streaming:
                    self._send_audio(np.asarray(chunk.audio, dtype=np.float32), chunk.sample_rate, job.metadata,
                                     segment_index=index, is_final=bool(chunk.is_final))
                    index += 1
                else:
                    chunks.append(chunk)
            if job.cancelled:
                raise SynthesisCancelled()
        except SynthesisCancelled:
            return self._cancelled(job)
        except NothingToSpeak as exc:  # emoji or symbols only; or every sentence had to be skipped
            self.log("WARNING" if exc.notes else "INFO", str(exc), job.metadata)
            return self._nothing_to_speak(job)
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
            self._send_audio(join_audio(chunks), self.engine.sample_rate, job.metadata)
        total = time.perf_counter() - job.received
        self.stats["syntheses"] += 1
        self.log("DEBUG", f"synthesised {job.request.text[:40]!r} in {total:.3f} s (first audio after "
                          f"{first_chunk_s or total:.3f} s; text+BERT {spent.get('frontend_s', 0) + spent.get('frontend_next_s', 0):.3f} s, "
                          f"GPT {spent.get('t2s_s', 0):.3f} s for {int(spent.get('tokens', 0))} tokens, "
                          f"SoVITS {spent.get('sovits_s', 0):.3f} s)", job.metadata)
        self._complete("completed", job.metadata)
        return None

    def _nothing_to_speak(self, job: _Job) -> None:
        """Characters but nothing to speak (emoji, symbols, unsupported scripts): a short silence keeps
        consumers that advance on audio (mofa's segmenter) moving, then `empty` as for blank text."""
        assert self.engine is not None
        extra = {"segment_index": 0, "is_final": True} if self.config.return_fragment else {}
        self._send_audio(np.zeros(int(NO_PHONES_SILENCE_S * self.engine.sample_rate), np.float32),
                         self.engine.sample_rate, job.metadata, **extra)
        self._complete("empty", job.metadata)

    def _send_audio(self, audio: np.ndarray, sample_rate: int, metadata: dict, **extra: Any) -> None:
        duration = float(len(audio)) / float(sample_rate)
        self.stats["audio_seconds"] += duration
        meta = {**metadata, "sample_rate": int(sample_rate), "duration": duration, **extra}
        # list<float32> of length 1: what primespeech sends and Python consumers index with [0]
        self.outbox.put(("audio", pa.array([audio], type=pa.list_(pa.float32())), meta))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no request is pending (tests and shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.cancel_all()
        self._jobs.put(None)
        self._worker.join()
