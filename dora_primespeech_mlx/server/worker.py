"""The server's MLX owner thread: builds the engine, prepares the default voice, warms up, then runs
speech jobs (engine.py's threading rule; the event loop never touches MLX). Each job hands its events to
the request's event loop with `loop.call_soon_threadsafe`: ("chunk", AudioChunk), then ("done", None), or
("error", exception) / ("cancelled", None).

When the engine decodes several rows per step (`engine.batch_rows > 1`, a GPU), jobs go to an
`engine_scheduler.Scheduler`: every job queued joins between decode steps and concurrent requests share
each GPT step (docs/server.md, concurrency). With one row (the CPU default, where rows are slower per
token) jobs run one at a time in arrival order through `Engine.synthesize_stream`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..node_config import NodeConfig
from ..options import SynthesisCancelled, SynthesisOptions
from ..voices import Voice, VoiceRegistry

logger = logging.getLogger(__name__)

EngineFactory = Callable[[NodeConfig, VoiceRegistry], Any]


def make_engine(config: NodeConfig, registry: VoiceRegistry):
    """The real engine over the server's registry; imported here so that a broken install is a start-up
    error the health check reports, not a crash."""
    from ..engine import Engine

    return Engine(config.model_dir, use_ane=config.use_ane, precision=config.precision, registry=registry)


@dataclass
class SpeechJob:
    """One request's synthesis. `events` belongs to `loop`; the owner thread only calls `emit`."""

    request_id: str
    text: str
    voice: Voice
    options: SynthesisOptions
    streaming: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Any thread: the synthesis stops within one GPT step, or never starts."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.cancel()


class SpeechWorker:
    """Owns the engine on thread `mlx-owner`. `ready` once the engine is loaded, the default voice
    prepared and warm; `init_error` if that failed (the thread then answers every job with it)."""

    def __init__(self, config: NodeConfig, registry: VoiceRegistry, default_voice: Callable[[], Voice],
                 factory: EngineFactory = make_engine, max_queue: int = 32):
        self.config = config
        self.registry = registry
        self._default_voice = default_voice
        self._factory = factory
        self.max_queue = max_queue
        self.engine: Any = None
        self.init_error: str | None = None
        self.ready = threading.Event()
        self._jobs: queue.Queue[SpeechJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[SpeechJob] = []
        self._current: SpeechJob | None = None
        self.scheduler: Any = None  # the engine_scheduler.Scheduler while jobs share decode steps
        self._thread = threading.Thread(target=self._own_mlx, name="mlx-owner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def loaded(self) -> bool:
        return self.ready.is_set() and self.engine is not None

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, job: SpeechJob) -> bool:
        """Queue a job; False when `max_queue` jobs are already waiting or running."""
        with self._lock:
            if len(self._pending) >= self.max_queue:
                return False
            self._pending.append(job)
        self._jobs.put(job)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running, and end the owner thread."""
        with self._lock:
            for job in self._pending:
                job.cancel()
        if self.engine is not None:
            self.engine.cancel()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the owner thread

    def _own_mlx(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine = self._factory(self.config, self.registry)
            voice = self._default_voice()
            self.engine.prepare_voice(voice)
            warm_up = getattr(self.engine, "warm_up", None)  # compiles the GPT step on a GPU; no-op on a CPU
            if warm_up is not None:
                warm_up(voice, self.config.options, streaming=True)
            logger.info("engine ready: voice %r prepared and warm in %.2f s (%s)", voice.id,
                        time.perf_counter() - t0, getattr(self.engine, "backend", "?"))
        except Exception as exc:  # the server stays up and reports it on /health
            self.engine = None
            self.init_error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine initialisation failed: check PRIMESPEECH_MODEL_DIR and VOICE_NAME")
        finally:
            self.ready.set()
        if self.engine is not None and getattr(self.engine, "batch_rows", 1) > 1:
            self._serve_shared()
        else:
            self._serve_fifo()

    def _serve_fifo(self) -> None:
        """One job at a time, in arrival order."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run(job)
            except BaseException as exc:  # the owner thread outlives any request
                logger.exception("request %s failed outside synthesis", job.request_id)
                job.emit("error", exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)

    def _serve_shared(self) -> None:
        """Jobs through the scheduler: those queued join between decode steps; waits only when idle."""
        from ..engine_scheduler import ScheduledRequest, Scheduler

        self.scheduler = scheduler = Scheduler(self.engine)
        while True:
            jobs: list[SpeechJob | None] = []
            try:
                jobs.append(self._jobs.get(block=not scheduler.busy))
                while True:
                    jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                pass
            for job in jobs:
                if job is not None:
                    scheduler.submit(ScheduledRequest(job.text, job.voice, self._sink(job), job.options,
                                                      streaming=job.streaming, submitted=job.submitted,
                                                      is_cancelled=lambda job=job: job.cancelled))
            try:
                scheduler.step()  # with None (close) queued: every job is cancelled, this step answers them
            except Exception as exc:  # noqa: BLE001 - a fault in the scheduler: answer everyone, carry on
                logger.exception("the scheduler failed; its requests are answered with the error")
                scheduler.abort(exc)
            if None in jobs:
                return

    def _sink(self, job: SpeechJob):
        """The scheduler's events for `job`: a final one takes it off the pending list first."""

        def sink(kind: str, payload: Any) -> None:
            if kind != "chunk":
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)
            job.emit(kind, None if kind == "cancelled" else payload)

        return sink

    def _run(self, job: SpeechJob) -> None:
        if job.cancelled:
            job.emit("cancelled")
            return
        if self.engine is None:
            job.emit("error", RuntimeError("the engine failed to start"))
            return
        try:
            for chunk in self.engine.synthesize_stream(job.text, job.voice, job.options, streaming=job.streaming,
                                                       is_cancelled=lambda: job.cancelled):
                if job.cancelled:
                    raise SynthesisCancelled()
                job.emit("chunk", chunk)
        except SynthesisCancelled:
            job.emit("cancelled")
            return
        except Exception as exc:  # noqa: BLE001 - answered to that request only
            if job.cancelled:
                job.emit("cancelled")
                return
            job.emit("error", exc)
            return
        job.emit("done")
