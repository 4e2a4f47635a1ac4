"""The OpenAI-compatible speech server (docs/server.md): a Starlette app over one MLX owner thread.

    app = create_app()            # configuration from the node's environment names (NodeConfig)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/audio/speech, GET|POST /v1/audio/voices, GET /health, GET /metrics, GET / and
/static/* (the playground). The event loop parses, checks and streams; every MLX call runs on the
worker's `mlx-owner` thread (worker.py): one request at a time on the CPU, concurrent requests sharing
decode steps where the engine batches (a GPU; engine_scheduler.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..node_config import NodeConfig
from ..options import NothingToSpeak, join_audio
from ..voices import Voice, VoiceRegistry, resolve_voice
from .encoding import MEDIA_TYPES, PCM_RATE, STREAMED, StreamEncoder, encode_whole, mp3_available
from .errors import ApiError
from .metrics import Metrics
from .speech import MAX_INPUT_CHARS, parse_speech
from .user_voices import UserVoiceStore, default_voices_dir
from .worker import EngineFactory, SpeechJob, SpeechWorker, make_engine

logger = logging.getLogger(__name__)

API_KEY_ENV = "GPT_SOVITS_API_KEY"
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SPEECH_BODY = 64 * 1024  # bytes: 4096 characters, JSON-escaped, plus the options
MAX_UPLOAD_BODY = 16 * 1024 * 1024  # bytes: a 10 s clip of 48 kHz stereo float WAV is 3.8 MB
# OpenAI's voice names: all speak with the default voice (docs/server.md)
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
ENDPOINTS = ("/v1/audio/speech", "/v1/audio/voices", "/health", "/metrics", "/")


class Server:
    """The app's state and handlers; one per `create_app`."""

    def __init__(self, config: NodeConfig, factory: EngineFactory, api_key: str | None, voices_dir: Path,
                 max_input_chars: int, max_speech_body: int, max_upload_body: int, max_queue: int):
        self.config = config
        self.api_key = api_key or None
        self.max_input_chars = max_input_chars
        self.max_speech_body = max_speech_body
        self.max_upload_body = max_upload_body
        self.metrics = Metrics()
        self.registry = VoiceRegistry(config.model_dir)  # plain Python: read on the event loop, shared with the engine
        self.store = UserVoiceStore(voices_dir, self.registry)
        self._ids = {vid.lower(): vid for vid in self.registry.ids()}
        self.default_voice = self._default_voice()
        self.worker = SpeechWorker(config, self.registry, lambda: self.default_voice, factory, max_queue)

    def _default_voice(self) -> Voice:
        name = self.config.voice_name
        found = self._find(name)
        if found is None:
            logger.error("VOICE_NAME=%r is not a voice here; the default voice is 'Doubao'", name)
            return self.registry.get("Doubao")
        return found

    def _find(self, name: str) -> Voice | None:
        key = name.strip().lower()
        if key in self._ids:
            return self.registry.get(self._ids[key])
        user = self.store.get(key)
        if user is not None:
            return user.voice
        found = resolve_voice(name.strip(), self.registry)  # mofa-studio's ids and aliases ("luoxiang", "dnz")
        return found.voice if found is not None else None

    def resolve(self, name: str | None) -> Voice:
        """A request's voice: an id (any case), else an OpenAI name (the default voice). 404 otherwise."""
        if name is None:
            return self.default_voice
        voice = self._find(name)
        if voice is None and name.strip().lower() in OPENAI_VOICES:
            return self.default_voice
        if voice is None:
            raise ApiError(404, f"unknown voice {name[:80]!r}: GET /v1/audio/voices lists the voices of this server",
                           "voice", "voice_not_found")
        if voice.missing_files():
            raise ApiError(404, f"voice {voice.id!r} is known but its model files are not installed on this server "
                                f"(gpt-sovits-mlx download --voices {voice.id!r} fetches them)", "voice",
                           "voice_not_installed")
        return voice

    # ---- request plumbing

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                f"key the server was given in {API_KEY_ENV}", None, "invalid_api_key")

    def check_ready(self) -> None:
        if not self.worker.ready.is_set():
            raise ApiError(503, "the engine is loading: retry in a few seconds (GET /health says when it is ready)",
                           None, "engine_loading")
        if self.worker.engine is None:
            raise ApiError(503, "the engine failed to start; the server's log says why", None, "engine_failed")

    @staticmethod
    async def read_body(request: Request, limit: int) -> bytes:
        too_large = ApiError(413, f"the body is larger than this endpoint's limit of {limit} bytes", None,
                             "body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    # ---- routes

    async def health(self, request: Request) -> Response:
        self.check_ready()
        return JSONResponse({"status": "ok", "voice": self.default_voice.id, "queue": self.worker.queue_depth,
                             "backend": str(getattr(self.worker.engine, "backend", "?"))})

    async def metrics_text(self, request: Request) -> Response:
        gauges = {"engine_ready": ("1 once the engine is loaded and warm.", float(self.worker.loaded)),
                  "queue_depth": ("Speech requests queued or running.", float(self.worker.queue_depth))}
        return PlainTextResponse(self.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    async def list_voices(self, request: Request) -> Response:
        self.check_key(request)
        voices = [{"id": v.id, "name": v.id, "language": v.text_lang, "source": "builtin"}
                  for v in (self.registry.get(vid) for vid in self.registry.ids()) if not v.missing_files()]
        voices += [{"id": u.voice.id, "name": u.voice.id, "language": u.language, "source": "user"}
                   for u in list(self.store.voices.values())]
        return JSONResponse({"voices": voices, "default": self.default_voice.id})

    async def add_voice(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_body(request, self.max_upload_body)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "send the voice as multipart/form-data with the fields name, transcript, language "
                                "and the file audio", None, "invalid_content_type")

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8,
                                         max_part_size=self.max_upload_body).parse()
        except MultiPartException as exc:
            raise ApiError(400, f"the form cannot be read: {exc.message}", None, "invalid_form") from None
        try:
            fields = {}
            for name in ("name", "transcript", "language"):
                value = form.get(name)
                if not isinstance(value, str):
                    raise ApiError(400, f"the form field {name!r} is required (text)", name, "missing_field")
                fields[name] = value
            audio = form.get("audio")
            if not isinstance(audio, UploadFile):
                raise ApiError(400, "the form needs the file field 'audio': a 3-10 s WAV or FLAC clip", "audio",
                               "missing_field")
            clip = await audio.read()
        finally:
            await form.close()
        voice = await asyncio.to_thread(self.store.add, fields["name"], fields["transcript"], fields["language"],
                                        clip, set(self._ids))
        return JSONResponse({"id": voice.voice.id}, status_code=201)

    async def speech(self, request: Request) -> Response:
        self.check_key(request)
        raw = await self.read_body(request, self.max_speech_body)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "the body is not valid JSON: send {\"input\": ..., \"voice\": ...} as "
                                "application/json", None, "invalid_json") from None
        req = parse_speech(body, self.config.options, max_chars=self.max_input_chars,
                           max_tokens_cap=self.config.max_new_tokens)
        voice = self.resolve(req.voice)
        if req.response_format == "mp3" and not mp3_available():
            raise ApiError(400, "mp3 is not available: this libsndfile cannot encode MP3 (it needs libsndfile 1.1 or "
                                "later); ask for wav, pcm or flac", "response_format", "unsupported_format")
        self.check_ready()
        rid = request.state.request_id
        job = SpeechJob(rid, req.input, voice, req.options_for(self.config.speed_factor or voice.speed_factor),
                        streaming=req.response_format in STREAMED, loop=asyncio.get_running_loop())
        if not self.worker.submit(job):
            raise ApiError(429, f"{self.worker.max_queue} requests are already queued: retry later", None,
                           "queue_full")
        logger.info("request %s: %d characters, voice %r, %s", rid, len(req.input), voice.id, req.response_format)
        gone = asyncio.ensure_future(wait_disconnect(request))

        def client_gone(task: asyncio.Future) -> None:
            if not task.cancelled():
                task.exception()  # retrieved: a failed receive also means the client is gone
                job.cancel()

        gone.add_done_callback(client_gone)
        try:
            kind, payload = await next_event(job, gone)
            if kind == "chunk":
                self.metrics.first_audio(time.perf_counter() - job.submitted)
            if kind == "chunk" and job.streaming:
                gone.cancel()  # from here StreamingResponse watches for the disconnect itself
                headers = {"X-Sample-Rate": str(PCM_RATE if req.response_format == "pcm" else payload.sample_rate)}
                # the background cancel covers a disconnect before the body generator's first step (its own
                # cleanup only runs once started); after a finished stream it is a no-op
                return StreamingResponse(self.stream(job, payload, req.response_format), headers=headers,
                                         media_type=MEDIA_TYPES[req.response_format],
                                         background=BackgroundTask(job.cancel))
            chunks = []
            while kind == "chunk":
                chunks.append(payload)
                kind, payload = await next_event(job, gone)
        except asyncio.CancelledError:  # the server is shutting down: stop the synthesis too
            job.cancel()
            raise
        finally:
            gone.cancel()
        self.check_outcome(job, kind, payload, chunks)
        audio = join_audio(chunks)
        data = await asyncio.to_thread(encode_whole, req.response_format, audio, chunks[0].sample_rate)
        self.metrics.audio(len(audio) / chunks[0].sample_rate)
        logger.info("request %s: %.2f s of audio in %.2f s", rid, len(audio) / chunks[0].sample_rate,
                    time.perf_counter() - job.submitted)
        return Response(data, media_type=MEDIA_TYPES[req.response_format])

    def check_outcome(self, job: SpeechJob, kind: str, payload: Any, chunks: list) -> None:
        """After the last event of a request answered as a whole: raise the error response, if any."""
        if kind == "cancelled":
            self.metrics.cancel()
            raise ApiError(499, "the client closed the request", None, "client_closed")
        if kind == "error":
            if isinstance(payload, NothingToSpeak):
                raise ApiError(400, "input has nothing to speak (only punctuation, symbols or emoji, or text in a "
                                    "language this voice cannot speak)", "input", "nothing_to_speak")
            self.metrics.error("before_audio" if not chunks else "whole_file")
            logger.error("request %s: synthesis failed: %s: %s", job.request_id, type(payload).__name__, payload)
            raise ApiError(500, f"synthesis failed (request {job.request_id}); the server's log says why", None,
                           "synthesis_failed")
        if not chunks:
            raise ApiError(500, f"the engine returned no audio (request {job.request_id})", None, "synthesis_failed")

    async def stream(self, job: SpeechJob, first, fmt: str):
        """The body of a streamed response: each chunk's bytes as soon as the owner thread made it. A
        failure after the first bytes ends the stream early (logged and counted: the status was sent)."""
        encoder = StreamEncoder(fmt, first.sample_rate)
        finished, chunk, seconds = False, first, 0.0
        try:
            while True:
                seconds += chunk.duration
                yield encoder.feed(chunk.audio)
                kind, chunk = await job.events.get()
                if kind == "chunk":
                    continue
                if kind == "done":
                    tail = encoder.finish()
                    if tail:
                        yield tail
                    logger.info("request %s: %.2f s of audio streamed in %.2f s", job.request_id, seconds,
                                time.perf_counter() - job.submitted)
                elif kind == "error":
                    self.metrics.error("mid_stream")
                    logger.error("request %s: synthesis failed mid-stream, the stream ends early: %s: %s",
                                 job.request_id, type(chunk).__name__, chunk)
                finished = True
                return
        finally:
            self.metrics.audio(seconds)
            if not finished:  # the client went away (the task was cancelled) or the loop is closing
                job.cancel()
                self.metrics.cancel()
                logger.info("request %s: client disconnected; synthesis cancelled", job.request_id)

    async def index(self, request: Request) -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "the playground page is not installed", None, "not_found")
        return FileResponse(page, media_type="text/html")


async def wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def next_event(job: SpeechJob, gone: asyncio.Future) -> tuple[str, Any]:
    """The job's next event, or ("cancelled", None) as soon as the client has gone."""
    if gone.done():
        return "cancelled", None
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return "cancelled", None


class RequestIds:
    """Outermost ASGI layer: an `X-Request-Id` on every response, the response counted by endpoint and
    status, and an unexpected exception answered as an OpenAI-style 500 (logged with the id)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = 0

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # a bug must still get a JSON answer with the id
            logger.exception("request %s failed", rid)
            if status == 0:
                error = ApiError(500, f"internal error (request {rid}); the server's log says why", None,
                                 "internal_error")
                await JSONResponse(error.body(), status_code=500)(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in ENDPOINTS else "/static" if path.startswith("/static/") else "other",
                                 status or 500)


async def api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
    else:
        raise exc
    headers = {"Retry-After": "5"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: Starlette's error middleware sends this, then re-raises for RequestIds to log with the id."""
    rid = request.scope.get("state", {}).get("request_id", "?")
    error = ApiError(500, f"internal error (request {rid}); the server's log says why", None, "internal_error")
    return JSONResponse(error.body(), status_code=500)


def create_app(config: NodeConfig | None = None, *, engine_factory: EngineFactory = make_engine,
               api_key: str | None = None, voices_dir: str | os.PathLike | None = None,
               max_input_chars: int = MAX_INPUT_CHARS, max_speech_body: int = MAX_SPEECH_BODY,
               max_upload_body: int = MAX_UPLOAD_BODY, max_queue: int = 32) -> Callable:
    """The ASGI app. `config`: NodeConfig.from_env() when None; `api_key`: $GPT_SOVITS_API_KEY when None
    (empty: no key); `voices_dir`: where added voices go (user_voices.default_voices_dir() when None);
    `engine_factory(config, registry)` builds the engine on the owner thread (tests pass tiny ones).
    The owner thread starts with the app's lifespan and stops with it."""
    config = config or NodeConfig.from_env()
    for note in config.notes:
        logger.warning("%s", note)
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    server = Server(config, engine_factory, key.strip() or None,
                    Path(voices_dir) if voices_dir is not None else default_voices_dir(), max_input_chars,
                    max_speech_body, max_upload_body, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.worker.close)

    routes = [
        Route("/v1/audio/speech", server.speech, methods=["POST"]),
        Route("/v1/audio/voices", server.list_voices, methods=["GET"]),
        Route("/v1/audio/voices", server.add_voice, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/", server.index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: api_error, Exception: internal_error})
    app.state.server = server
    outer = RequestIds(app, server.metrics)
    outer.server = server  # for tests and the CLI
    return outer
