"""The server with an engine that decodes several rows per step (`batch_rows` 4, as on a GPU; the CPU
default of 1 keeps the FIFO worker that tests/test_server.py covers): concurrent requests share decode
steps through engine_scheduler, each gets the audio it gets alone, and a client that disconnects cancels
its synthesis without disturbing the others. Tiny random-weight models, the official `openai` client."""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dora_primespeech_mlx.constants import CACHE_ENV
from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.server.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import tiny_models  # noqa: E402
from test_server import (  # noqa: E402
    MAX_NEW_TOKENS,
    SAMPLES_PER_TOKEN,
    RunningServer,
    metric,
    parse_stream_wav,
    post_long_text,
    tiny_config,
    wait_idle,
)

pytestmark = pytest.mark.fast

LSB = 1 / 32767


class FailsInItsSecondSentence(Engine):
    """The real engine, except that while `armed`, making a chunk of a second sentence fails (the scheduler
    makes every chunk through `_chunk`; only the failing request of that test has a second sentence)."""

    armed = False

    def _chunk(self, audio, sentence, chunk, final, timings, t_start, notes=None):
        if self.armed and sentence == 1:
            raise RuntimeError("simulated failure in the second sentence")
        return super()._chunk(audio, sentence, chunk, final, timings, t_start, notes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dora_primespeech_mlx.text import chinese, g2pw

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("batched-server-cache"))
    resolver, status = chinese._polyphones, g2pw._status
    tiny_dir = tiny_models.build_tiny_model_dir(tmp_path_factory.mktemp("batched-server-tiny") / "models")

    def factory(config, registry):
        return FailsInItsSecondSentence(config.model_dir, registry=registry, batch_rows=4)

    running = RunningServer(create_app(tiny_config(tiny_dir), engine_factory=factory, api_key="",
                                       voices_dir=tmp_path_factory.mktemp("batched-voices")))
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()
        chinese._polyphones, g2pw._status = resolver, status
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old


REQUESTS = [  # (input, response_format, extra body): streamed (wav, pcm) and whole (flac), different options
    ("第一个并发的请求。它有两句话。", "wav", {"seed": 3}),
    ("第二个请求说得慢一点。", "pcm", {"seed": 4, "top_k": 3}),
    ("Third request, in English.", "wav", {"seed": 5, "text_lang": "en", "temperature": 0.8}),
    ("第四个请求整段返回。", "flac", {"seed": 6, "repetition_penalty": 1.2}),
]


def samples(fmt: str, content: bytes) -> np.ndarray:
    if fmt == "wav":
        return parse_stream_wav(content).astype(np.float32) / 32767
    if fmt == "pcm":
        return np.frombuffer(content, "<i2").astype(np.float32) / 32767
    return sf.read(io.BytesIO(content), dtype="float32")[0]


def speak(server, text: str, fmt: str, extra: dict) -> np.ndarray:
    reply = server.client().audio.speech.create(model="tts-1", voice="Doubao", input=text, response_format=fmt,
                                                speed=0.9 if fmt == "pcm" else 1.0, extra_body=extra)
    return samples(fmt, reply.content)


def test_concurrent_requests_share_steps_and_sound_as_alone(server):
    worker = server.app.server.worker
    assert worker.scheduler is not None  # batch_rows > 1: jobs go through the scheduler
    start = threading.Barrier(len(REQUESTS))
    results: dict[int, object] = {}

    def one(i: int) -> None:
        start.wait(30)
        try:
            results[i] = speak(server, *REQUESTS[i])
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert worker.scheduler.peak_shared >= 2  # rows of different requests in one decode step
    for i, (text, fmt, extra) in enumerate(REQUESTS):
        got = results[i]
        assert isinstance(got, np.ndarray) and got.size > 0, f"request {i}: {got!r}"
        alone = speak(server, text, fmt, extra)  # the same request by itself
        assert got.shape == alone.shape
        np.testing.assert_allclose(got, alone, atol=4 * LSB)  # 16-bit rounding of float differences <= 1e-4
        assert np.abs(got).max() > 0.03
    assert worker.queue_depth == 0 and worker.scheduler.in_flight == 0


def test_a_disconnect_cancels_only_its_request(server):
    worker = server.app.server.worker
    cancelled = metric(server.url, "gpt_sovits_cancelled_total")
    conn = post_long_text(server, "pcm")
    reply = conn.getresponse()
    assert reply.status == 200 and len(reply.read1(4096)) > 0  # the long stream has started
    other: dict[str, object] = {}

    def concurrent() -> None:
        try:
            other["audio"] = speak(server, *REQUESTS[0])
        except Exception as exc:  # noqa: BLE001
            other["audio"] = exc

    thread = threading.Thread(target=concurrent)
    thread.start()
    deadline = time.monotonic() + 10
    while worker.queue_depth < 2:  # both in flight
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    thread.join(60)
    assert wait_idle(server, 10) < 10  # the long request was dropped (60 sentences would take far longer)
    deadline = time.monotonic() + 5
    while metric(server.url, "gpt_sovits_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    alone = speak(server, *REQUESTS[0])
    assert isinstance(other["audio"], np.ndarray) and other["audio"].shape == alone.shape
    np.testing.assert_allclose(other["audio"], alone, atol=4 * LSB)


def test_a_request_failing_mid_stream_leaves_the_others(server):
    errors = metric(server.url, 'gpt_sovits_synthesis_errors_total{stage="mid_stream"}')
    start = threading.Barrier(3)
    results: dict[str, object] = {}

    def failing() -> None:
        start.wait(30)
        with server.client().audio.speech.with_streaming_response.create(
                model="tts-1", voice="Doubao", input="第一句会说完。第二句会失败。", response_format="pcm",
                extra_body={"seed": 1}) as response:
            results["failing"] = (response.status_code, b"".join(response.iter_bytes()))

    single = {0: ("这个请求只有一句话。", "wav", {"seed": 3}), 1: ("This one is in English.", "pcm", {"seed": 5})}

    def fine(i: int) -> None:
        start.wait(30)
        results[i] = speak(server, *single[i])

    engine = server.app.server.worker.engine
    threads = [threading.Thread(target=failing)] + [threading.Thread(target=fine, args=(i,)) for i in single]
    engine.armed = True
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.armed = False
    status, body = results["failing"]
    # the status went out with the first sentence's audio; the stream ends early, counted as a mid-stream error
    assert status == 200 and 0 < len(body) <= MAX_NEW_TOKENS * SAMPLES_PER_TOKEN * 2 and len(body) % 2 == 0
    assert metric(server.url, 'gpt_sovits_synthesis_errors_total{stage="mid_stream"}') == errors + 1
    for i in single:
        alone = speak(server, *single[i])
        assert results[i].shape == alone.shape
        np.testing.assert_allclose(results[i], alone, atol=4 * LSB)
    assert server.app.server.worker.queue_depth == 0
