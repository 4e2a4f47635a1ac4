"""Several requests in flight on the engine's owner thread, sharing GPT decode steps (issue 21).

    scheduler = Scheduler(engine)                      # on the engine's owner thread
    scheduler.submit(ScheduledRequest(text, voice, sink, options, streaming=True))
    while scheduler.busy:
        scheduler.step()                               # new requests may be submitted between steps

`Engine.synthesize_stream` runs one request from start to end. Here each request's sentences become
rows of a `models.t2s_batch.BatchDecoder`, one decoder per GPT model (voices with different GPT files
decode in separate decoders, stepped in turn), so concurrent requests share each decode step. One
`step()`:

1. admits the requests submitted since the last step (voice prompt, models, the first sentence's
   frontend and BERT); a request that fails here (unknown voice, nothing to speak) is answered at once;
2. drops the rows of cancelled requests (`is_cancelled()`), answering them with `SynthesisCancelled`;
3. fills free rows, each to the request with the fewest rows (the earliest among equals), at most
   `max_rows` per decoder (default `engine.batch_rows`; the others wait). A streaming request has one
   sentence decoding at a time, so its SoVITS windows come out in order; a whole-text request may decode
   all its sentences together (like `batch_synthesis`), each sentence's audio leaving in sentence order;
4. steps each decoder once (one host sync for all its rows) and hands every token to its request:
   `on_token`, a `SoVITSStreamDecoder` per streaming row (a chunk per window), and at a sentence's end
   the whole-sentence decode or the stream's tail, with the sentence's silence.

A sentence keeps its seed (`options.seed + index`), its length guard and its sampling settings, and a
row decodes the tokens its single decode gives (models/t2s_batch.py), so each request's audio is what
`Engine.synthesize_stream` makes for it alone, up to the float rounding of batched matmuls. Chunks are
made by `Engine._chunk` (peak limit, timings, notes), as there.

Each request reports to its own `sink(kind, payload)`: ("chunk", AudioChunk) ..., then ("done", None),
("cancelled", SynthesisCancelled) or ("error", exception). A request's failure (its frontend, SoVITS,
its sink or `on_token` raising) removes only its rows; a decoder step that fails fails the requests with
rows in that decoder, and the next step starts a fresh decoder. All of it runs on the engine's owner
thread (engine.py's threading rule); only `submit` may be called from another thread.

Timings per chunk: `t2s_s` is the wall time of the decode steps the sentence's row took part in since
its previous chunk (steps shared with other rows count in full for each), `sovits_s` its own SoVITS
time, `frontend_s` the request's first sentence's frontend (+ BERT where it is not lazy: Core ML; MLX's
BERT runs with the row's prefill and counts in `t2s_s`) on its first chunk, `batch_rows`
the rows of its decoder at its last step, `queued_s` (first chunk) the wait between `submit` and
admission; `elapsed_s` counts from `submit`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .engine import DEFAULT_FRAGMENT_INTERVAL, length_guard
from .models.t2s_batch import BatchDecoder, BatchStep
from .options import NothingToSpeak, SynthesisCancelled, SynthesisOptions
from .text.frontend import request_sentences
from .voices import Voice

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "ScheduledRequest"]

IDLE_DECODERS = 3  # decoders kept while idle (each keeps its compiled step functions), one per GPT model

Sink = Callable[[str, Any], None]


@dataclass
class ScheduledRequest:
    """One synthesis: `Engine.synthesize_stream`'s arguments plus where its events go."""

    text: str
    voice: Voice | str
    sink: Sink  # sink(kind, payload): "chunk" AudioChunk, then "done" None | "cancelled" exc | "error" exc
    options: SynthesisOptions | None = None
    streaming: bool = True
    first_chunk_tokens: int | None = None  # None: the engine's (Engine.first_chunk_tokens)
    chunk_tokens: int = 50
    on_token: Callable[[int], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    submitted: float = field(default_factory=time.perf_counter)


class _Lane:
    """One GPT model's decoder and the rows in it."""

    def __init__(self, t2s):
        self.t2s = t2s  # held so that the model outlives its rows even if the engine's LRU drops it
        self.decoder = BatchDecoder(t2s)
        self.rows: dict[int, _Row] = {}


@dataclass(eq=False)
class _Row:
    """One sentence of one request, decoding in a lane."""

    req: _Active
    lane: _Lane
    row_id: int
    index: int  # sentence index in its request
    stream: Any  # SoVITSStreamDecoder (streaming) or None
    tokens: list[int] = field(default_factory=list)
    chunk_index: int = 0
    t2s_s: float = 0.0
    sovits_s: float = 0.0
    batch_rows: int = 1


class _Active:
    """An admitted request: its voice state, its sentences (made lazily) and its rows."""

    def __init__(self, engine, spec: ScheduledRequest):
        self.engine = engine
        self.spec = spec
        self.t_start = spec.submitted
        self.queued_s = time.perf_counter() - spec.submitted
        self.options = options = spec.options or SynthesisOptions()
        voice = engine.registry.get(spec.voice) if isinstance(spec.voice, str) else spec.voice
        self.voice = voice
        self.speed = options.speed if options.speed is not None else voice.speed_factor
        self.interval = DEFAULT_FRAGMENT_INTERVAL if options.fragment_interval is None else options.fragment_interval
        self.prompt = engine.prepare_voice(voice)
        self.t2s, self.sovits = engine.voice_models(voice)
        self.notes: list[str] = []
        self._texts: Iterator = iter(request_sentences(spec.text, options.text_lang or voice.text_lang,
                                                       notes=self.notes))
        self._sentences: list = []
        self._exhausted = False
        self.next_row = 0  # the next sentence to become a row
        self.next_out = 0  # the next sentence to leave
        self.ready: dict[int, tuple] = {}  # finished sentences waiting for earlier ones: audio, chunk, timings, tokens
        self.rows: list[_Row] = []
        self.finished = False
        t0 = time.perf_counter()
        first = self.sentence(0)
        self.frontend_s = time.perf_counter() - t0
        if first is None:
            reason = "; ".join(self.notes) or "no phones after normalisation"
            raise NothingToSpeak(f"text {spec.text[:60]!r} has nothing to speak ({reason[:400]})", self.notes)

    def cancelled(self) -> bool:
        return self.spec.is_cancelled is not None and bool(self.spec.is_cancelled())

    def sentence(self, i: int):
        """Sentence `i` (phones + BERT), made on first need; None past the end. A sentence whose BERT
        fails is skipped with a note, as the engine does."""
        while len(self._sentences) <= i and not self._exhausted:
            for sentence in self._texts:
                try:
                    self._sentences.append(self.engine._with_bert(sentence))
                    break
                except Exception as exc:  # noqa: BLE001 - skip the sentence, speak the rest
                    self.notes.append(f"skipped {sentence.text[:40]!r}: {type(exc).__name__}: {str(exc)[:200]}")
                    logger.warning("skipped sentence %r: %s", sentence.text[:40], exc)
            else:
                self._exhausted = True
        return self._sentences[i] if i < len(self._sentences) else None

    def seed(self, i: int) -> int | None:
        return None if self.options.seed is None else self.options.seed + i


class Scheduler:
    """Concurrent requests over one engine (module doc). Owner thread only, except `submit`."""

    def __init__(self, engine, *, max_rows: int | None = None):
        self.engine = engine
        self.max_rows = max(1, int(engine.batch_rows if max_rows is None else max_rows))
        self._incoming: deque[ScheduledRequest] = deque()
        self._lock = threading.Lock()
        self._active: list[_Active] = []
        self._lanes: OrderedDict[int, _Lane] = OrderedDict()  # id(t2s) -> lane; the lane holds the model
        self.peak_shared = 0  # the most requests that had rows in one decoder step (a figure for tests and logs)

    # ------------------------------------------------------------------------------ outside

    def submit(self, request: ScheduledRequest) -> None:
        """Queue a request (any thread); it is admitted at the next `step()`."""
        with self._lock:
            self._incoming.append(request)

    @property
    def busy(self) -> bool:
        """Requests waiting for admission or in flight."""
        with self._lock:
            return bool(self._incoming or self._active)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def rows(self) -> int:
        """Rows decoding now, over all decoders."""
        return sum(len(lane.rows) for lane in self._lanes.values())

    def run_until_idle(self) -> None:
        """Step until every submitted request has been answered."""
        while self.busy:
            self.step()

    def abort(self, exc: BaseException) -> None:
        """Answer every request with `exc` and start over with fresh decoders (a fault in the scheduler
        itself; the adapter's last resort)."""
        with self._lock:
            incoming, self._incoming = list(self._incoming), deque()
        for spec in incoming:
            _deliver(spec.sink, "error", exc)
        for req in list(self._active):
            self._fail(req, exc)
        self._lanes.clear()

    # ------------------------------------------------------------------------------ one step

    def step(self) -> None:
        """Admit, drop cancelled, fill rows, step every decoder once (module doc)."""
        self.engine.check_thread("Scheduler.step")
        self._admit()
        for req in list(self._active):
            if req.cancelled():
                self._fail(req, SynthesisCancelled())
        self._fill()
        for key, lane in list(self._lanes.items()):
            if lane.rows:
                self._step_lane(key, lane)
        self._trim_lanes()
        if not self._active:
            mx.clear_cache()  # release buffers between requests, as the engine does after each one

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._incoming:
                    return
                spec = self._incoming.popleft()
            if spec.is_cancelled is not None and spec.is_cancelled():
                _deliver(spec.sink, "cancelled", SynthesisCancelled())
                continue
            try:
                req = _Active(self.engine, spec)
            except Exception as exc:  # noqa: BLE001 - answered to that request only
                _deliver(spec.sink, "cancelled" if isinstance(exc, SynthesisCancelled) else "error", exc)
                continue
            self._active.append(req)

    def _lane(self, t2s) -> _Lane:
        lane = self._lanes.get(id(t2s))
        if lane is None or lane.t2s is not t2s:
            lane = self._lanes[id(t2s)] = _Lane(t2s)
        self._lanes.move_to_end(id(t2s))
        return lane

    def _trim_lanes(self) -> None:
        """Keep at most `IDLE_DECODERS` decoders without rows (the most recent: their compiled steps)."""
        idle = [key for key, lane in self._lanes.items() if not lane.rows]
        for key in idle[:max(0, len(self._lanes) - IDLE_DECODERS)]:
            del self._lanes[key]

    def _wants_row(self, req: _Active) -> bool:
        if req.finished or (req.spec.streaming and req.rows):
            return False  # streaming: one sentence at a time, so windows leave in order
        return req.sentence(req.next_row) is not None

    def _fill(self) -> None:
        """Free rows to waiting sentences, one at a time, each to the request with the fewest rows (the
        earliest among equals): a newcomer gets the next free row before a long text takes another."""
        while True:
            waiting = []
            for req in list(self._active):
                if req.finished or len(self._lane(req.t2s).rows) >= self.max_rows:
                    continue
                try:
                    if self._wants_row(req):
                        waiting.append(req)
                except Exception as exc:  # noqa: BLE001 - its frontend: answered to that request only
                    self._fail(req, exc)
            if not waiting:
                return
            req = min(waiting, key=lambda r: len(r.rows))
            try:
                self._add_row(req, self._lane(req.t2s))
            except Exception as exc:  # noqa: BLE001 - answered to that request only
                self._fail(req, exc)

    def _add_row(self, req: _Active, lane: _Lane) -> None:
        i = req.next_row
        sentence = req.sentence(i)
        options, prompt = req.options, req.prompt
        stream = None
        if req.spec.streaming:
            from .models.sovits_stream import SoVITSStreamDecoder

            t0 = time.perf_counter()
            stream = SoVITSStreamDecoder(req.sovits, sentence.phone_ids, ge=prompt.style, speed=req.speed,
                                         noise_scale=options.noise_scale, seed=req.seed(i),
                                         first_chunk_codes=req.spec.first_chunk_tokens
                                         or self.engine.first_chunk_tokens,
                                         chunk_codes=req.spec.chunk_tokens)
            sovits_s = time.perf_counter() - t0
        else:
            sovits_s = 0.0
        t0 = time.perf_counter()
        row_id = lane.decoder.add(
            *prompt.gpt_inputs(sentence),
            top_k=options.top_k, top_p=options.top_p, temperature=options.temperature,
            repetition_penalty=options.repetition_penalty, seed=req.seed(i),
            max_new_tokens=length_guard(sentence.phone_ids.size, options.max_new_tokens, self.engine.tokens_per_phone))
        row = _Row(req, lane, row_id, i, stream, t2s_s=time.perf_counter() - t0, sovits_s=sovits_s)
        lane.rows[row_id] = row
        req.rows.append(row)
        req.next_row += 1

    def _step_lane(self, key: int, lane: _Lane) -> None:
        self.peak_shared = max(self.peak_shared, len({id(row.req) for row in lane.rows.values()}))
        t0 = time.perf_counter()
        try:
            steps = lane.decoder.step()
        except Exception as exc:  # noqa: BLE001 - the decoder's state is unknown: its requests fail
            logger.exception("a batched decode step failed: %d request(s) answered with the error",
                             len({id(r.req) for r in lane.rows.values()}))
            for row in list(lane.rows.values()):
                self._fail(row.req, exc)
            if self._lanes.get(key) is lane:
                del self._lanes[key]  # the next request of this model starts a fresh decoder
            return
        spent = time.perf_counter() - t0
        for step in steps:
            row = lane.rows.get(step.row)
            if row is None:  # its request failed earlier in this loop
                continue
            if step.stop_reason is not None:
                del lane.rows[step.row]  # the decoder has dropped it
            row.t2s_s += spent
            row.batch_rows = len(steps)
            if row.req.finished:
                continue
            try:
                self._on_step(row, step)
            except Exception as exc:  # noqa: BLE001 - answered to that request only
                self._fail(row.req, exc)

    # ------------------------------------------------------------------------------ per request

    def _timings(self, row: _Row) -> dict:
        timings = {"t2s_s": row.t2s_s, "sovits_s": row.sovits_s, "batch_rows": float(row.batch_rows)}
        if row.index == 0 and row.chunk_index == 0:
            timings.update(frontend_s=row.req.frontend_s, queued_s=row.req.queued_s)
        row.t2s_s = row.sovits_s = 0.0
        return timings

    def _on_step(self, row: _Row, step: BatchStep) -> None:
        req = row.req
        if step.stop_reason != "eos":  # an EOS step's token is not part of the output
            row.tokens.append(step.token)
            if row.stream is not None:
                if req.spec.on_token is not None:  # whole text: in sentence order, as its sentences leave
                    req.spec.on_token(step.token)
                t0 = time.perf_counter()
                audio = row.stream.feed(step.token)
                row.sovits_s += time.perf_counter() - t0
                if audio.size:
                    chunk = self.engine._chunk(audio, row.index, row.chunk_index, False, self._timings(row),
                                               req.t_start, req.notes)
                    row.chunk_index += 1
                    self._send(req, "chunk", chunk)
        if step.stop_reason is not None and not req.finished:
            self._finish_row(row)

    def _finish_row(self, row: _Row) -> None:
        req = row.req
        req.rows.remove(row)
        t0 = time.perf_counter()
        tokens = row.tokens
        sentence = req.sentence(row.index)
        if not tokens:  # upstream decodes a single 0 code when the GPT stops at once
            tokens = [0]
            if row.stream is not None:
                row.stream.feed(0)
        if row.stream is not None:
            audio = row.stream.finish()
        else:
            audio = req.sovits.decode(np.asarray(tokens, np.int64), sentence.phone_ids, ge=req.prompt.style,
                                      speed=req.speed, noise_scale=req.options.noise_scale, seed=req.seed(row.index))
        row.sovits_s += time.perf_counter() - t0
        timings = self._timings(row)
        timings["tokens"] = float(len(tokens))
        silence = np.zeros(int(round(req.interval * self.engine.sample_rate)), np.float32)
        req.ready[row.index] = (np.concatenate([audio.astype(np.float32), silence]), row.chunk_index, timings,
                                [] if row.stream is not None else row.tokens)
        self._flush(req)

    def _flush(self, req: _Active) -> None:
        """Send the finished sentences that are next in order; the request is done after its last."""
        while not req.finished and req.next_out in req.ready:
            i = req.next_out
            audio, chunk_index, timings, tokens = req.ready.pop(i)
            if req.spec.on_token is not None:
                for token in tokens:
                    req.spec.on_token(token)
            t0 = time.perf_counter()
            last = req.sentence(i + 1) is None  # the next sentence's frontend + BERT: is this one the last?
            timings["frontend_next_s"] = time.perf_counter() - t0
            chunk = self.engine._chunk(audio, i, chunk_index, last, timings, req.t_start, req.notes)
            req.next_out += 1
            self._send(req, "chunk", chunk)
            if last and not req.finished:
                self._retire(req)
                self._send(req, "done", None)

    def _send(self, req: _Active, kind: str, payload: Any) -> None:
        """Hand an event to the request's sink; a sink that raises fails its own request (if still running)."""
        try:
            req.spec.sink(kind, payload)
        except Exception as exc:  # noqa: BLE001
            if req.finished:
                logger.exception("a request's sink raised on %r", kind)
            else:
                self._fail(req, exc)

    def _retire(self, req: _Active) -> None:
        """Take a request out: its rows leave their decoders between steps."""
        req.finished = True
        for row in req.rows:
            row.lane.decoder.remove(row.row_id)
            row.lane.rows.pop(row.row_id, None)
        req.rows.clear()
        if req in self._active:
            self._active.remove(req)

    def _fail(self, req: _Active, exc: BaseException) -> None:
        if req.finished:
            return
        self._retire(req)
        if not isinstance(exc, SynthesisCancelled):
            logger.warning("request failed: %s: %s", type(exc).__name__, exc)
        _deliver(req.spec.sink, "cancelled" if isinstance(exc, SynthesisCancelled) else "error", exc)


def _deliver(sink: Sink, kind: str, payload: Any) -> None:
    """A final event: a sink that raises here is logged (there is nothing left to fail)."""
    try:
        sink(kind, payload)
    except Exception:  # noqa: BLE001
        logger.exception("a request's sink raised on %r", kind)
