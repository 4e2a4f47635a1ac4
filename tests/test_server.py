"""The OpenAI-compatible speech server (dora_primespeech_mlx/server, docs/server.md), tested through the
official `openai` Python client against the real app in uvicorn on a free localhost port, over tiny
random-weight models (tests/support/tiny_models.py) with MAX_NEW_TOKENS=30: WAV, streamed PCM, flac and
mp3, four concurrent requests, every error case, a client that disconnects, the add-a-voice round trip,
a failure mid-stream, the API key and the 503 while the engine loads."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.node_config import NodeConfig
from dora_primespeech_mlx.server import serve
from dora_primespeech_mlx.server.app import create_app
from dora_primespeech_mlx.server.worker import make_engine

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import tiny_models

pytestmark = pytest.mark.fast

MAX_NEW_TOKENS = 30
SAMPLES_PER_TOKEN = 1280  # 2 frames of 640 samples at 32 kHz per semantic token
TEXT = "你好，世界。今天天气很好。"
KEY = "test-key-123"


class RunningServer:
    """uvicorn serving `app` in a thread on a socket bound to a free 127.0.0.1 port."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def client(self, api_key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while http_get(self.url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "the engine did not become ready"
            time.sleep(0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def http_get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def post_form(url: str, fields: dict[str, str], clip: bytes | None, filename: str = "clip.wav"):
    """multipart/form-data, written out by hand (the stdlib has no encoder)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if clip is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="{filename}"\r\n'
                     "Content-Type: audio/wav\r\n\r\n".encode() + clip + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wav_bytes(seconds: float, rate: int = 16000, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
             + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def parse_stream_wav(data: bytes) -> np.ndarray:
    """Check the streaming header (PCM16 mono 32 kHz, sizes 0xFFFFFFFF) and return the samples."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF and struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    fmt_size, tag, channels, rate, byte_rate, align, bits = struct.unpack("<IHHIIHH", data[16:36])
    assert (fmt_size, tag, channels, rate, byte_rate, align, bits) == (16, 1, 1, 32000, 64000, 2, 16)
    assert (len(data) - 44) % 2 == 0
    return np.frombuffer(data[44:], "<i2")


def max_samples(sentences: int) -> int:
    """The most audio a text of `sentences` may give at MAX_NEW_TOKENS (speed 1.1 shortens it; 0.07 s gaps)."""
    return sentences * (MAX_NEW_TOKENS * SAMPLES_PER_TOKEN + int(0.07 * 32000))


def metric(url: str, line_start: str) -> float:
    text = http_get(url + "/metrics")[1].decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Tiny models, their conversions cached in a private folder; the G2PW state the engine sets is put back."""
    with tiny_models.private_tiny_dir(tmp_path_factory, "server") as models:
        yield models


def tiny_config(tiny_dir: Path) -> NodeConfig:
    return NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(tiny_dir), "MAX_NEW_TOKENS": str(MAX_NEW_TOKENS)})


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user-voices")


@pytest.fixture(scope="module")
def server(tiny_dir, voices_dir):
    running = RunningServer(create_app(tiny_config(tiny_dir), api_key="", voices_dir=voices_dir))
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


# ------------------------------------------------------------------------------ audio


def test_wav_through_the_openai_client(server):
    raw = server.client().audio.speech.with_raw_response.create(model="tts-1", voice="doubao", input=TEXT,
                                                                 response_format="wav")
    assert raw.headers["content-type"] == "audio/wav" and len(raw.headers["x-request-id"]) == 16
    content = raw.parse().content
    samples = parse_stream_wav(content)
    assert 0.5 * 32000 < samples.size <= max_samples(2)  # two sentences, each at most 30 tokens
    assert np.abs(samples).max() > 1000  # sound, not silence
    decoded, rate = sf.read(io.BytesIO(content), dtype="int16")  # a common reader takes the streaming header
    assert rate == 32000 and np.array_equal(decoded, samples)


def test_pcm_streams_in_several_chunks_at_24khz(server):
    reads, arrivals = [], []
    t0 = time.perf_counter()
    with server.client().audio.speech.with_streaming_response.create(
            model="tts-1", voice="Doubao", input=TEXT, response_format="pcm", extra_body={"seed": 7}) as response:
        assert response.headers["content-type"] == "audio/pcm" and response.headers["x-sample-rate"] == "24000"
        for part in response.iter_bytes():
            reads.append(part)
            arrivals.append(time.perf_counter() - t0)
    body = b"".join(reads)
    assert len(body) % 2 == 0
    # the engine yields a window after 25 tokens and the rest of each sentence: several network reads,
    # the first well before the last (the first bytes leave when the first chunk exists)
    assert len(reads) >= 3 and arrivals[-1] - arrivals[0] > 0.1
    pcm = np.frombuffer(body, "<i2").astype(np.float32) / 32767
    # the same request and seed as WAV: the PCM body is that audio resampled to 24 kHz
    wav = server.client().audio.speech.create(model="tts-1", voice="Doubao", input=TEXT, response_format="wav",
                                              extra_body={"seed": 7})
    ref = parse_stream_wav(wav.content).astype(np.float32) / 32767
    assert abs(pcm.size - round(ref.size * 0.75)) <= 2
    import soxr

    expected = soxr.resample(ref, 32000, 24000, quality="HQ")
    n = min(expected.size, pcm.size)
    assert np.corrcoef(expected[:n], pcm[:n])[0, 1] > 0.99


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_whole_file_formats_decode(server, fmt):
    audio = server.client().audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=fmt)
    data, rate = sf.read(io.BytesIO(audio.content), dtype="float32")
    assert rate == 32000 and 0.5 * 32000 < data.shape[0] <= max_samples(2) + 2304  # mp3 pads up to 2 frames
    assert np.abs(data).max() > 0.03


def test_four_concurrent_requests_all_succeed(server):
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            reply = server.client().audio.speech.create(model="tts-1", voice="Doubao", input=f"第{i + 1}个请求。",
                                                        response_format="wav")
            results[i] = parse_stream_wav(reply.content)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, samples in results.items():
        assert isinstance(samples, np.ndarray), f"request {i}: {samples!r}"
        assert 0 < samples.size <= max_samples(1)


# ------------------------------------------------------------------------------ errors


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return info.value.status_code, body["error"]


def test_error_cases_are_openai_style(server):
    speech = server.client().audio.speech

    status, err = error_of(lambda: speech.create(model="tts-1", voice="nobody", input="你好。"))
    assert status == 404 and err["param"] == "voice" and "nobody" in err["message"]
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="  "))
    assert status == 400 and err["param"] == "input"
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="好" * 4097))
    assert status == 400 and err["code"] == "input_too_long" and "4096" in err["message"]
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="你好。", response_format="ogg"))
    assert status == 400 and err["param"] == "response_format" and "wav" in err["message"]
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="你好。",
                                                 extra_body={"padding": "x" * 70_000}))
    assert status == 413 and err["code"] == "body_too_large"
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="你好。",
                                                 extra_body={"top_k": 0}))
    assert status == 400 and err["param"] == "top_k"
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="你好。",
                                                 extra_body={"max_new_tokens": MAX_NEW_TOKENS + 1}))
    assert status == 400 and err["param"] == "max_new_tokens" and str(MAX_NEW_TOKENS) in err["message"]
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="你好。",
                                                 extra_body={"topk": 3}))
    assert status == 400 and err["code"] == "unknown_field" and "topk" in err["message"]
    status, err = error_of(lambda: speech.create(model="tts-1", voice="Doubao", input="😀😀 ~~~",
                                                 response_format="wav"))
    assert status == 400 and err["code"] == "nothing_to_speak"
    # a voice of the built-in table whose files this model dir lacks: 404 naming the fix, no path
    status, err = error_of(lambda: speech.create(model="tts-1", voice="luo xiang", input="你好。"))
    assert status == 404 and err["code"] == "voice_not_installed" and str(server.app.server.config.model_dir) \
        not in err["message"]
    # not JSON at all, and an unknown route: still the JSON error shape, never a 500
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/audio/speech", body=b"{not json", headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 400 and json.loads(reply.read())["error"]["code"] == "invalid_json"
    conn.close()
    for raw, code in ((b'{"input": "\\ud800\\u4f60"}', "invalid_value"), (b"[" * 60_000, "invalid_json"),
                      (b'{"input": 123}', "invalid_type"), (b'{"input": ["hi"]}', "invalid_type")):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/audio/speech", body=raw, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert (reply.status, json.loads(reply.read())["error"]["code"]) == (400, code)
        conn.close()
    status, body, _ = http_get(server.url + "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    assert metric(server.url, 'gpt_sovits_requests_total{endpoint="/v1/audio/speech",status="500"}') == 0


# ------------------------------------------------------------------------------ disconnects


def wait_idle(server, timeout: float) -> float:
    t0 = time.monotonic()
    while server.app.server.worker.queue_depth:
        assert time.monotonic() - t0 < timeout, "the owner thread is still on the abandoned request"
        time.sleep(0.05)
    return time.monotonic() - t0


LONG_TEXT = "".join(f"这是第{i}句话。" for i in range(1, 61))  # 60 sentences: about 30 s of work on this CPU


def post_long_text(server, response_format: str) -> http.client.HTTPConnection:
    """POST LONG_TEXT in Doubao's voice on a raw connection (so the test can drop it); returns the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/audio/speech", body=json.dumps({"input": LONG_TEXT, "voice": "Doubao",
                                                              "response_format": response_format}),
                 headers={"Content-Type": "application/json"})
    return conn


def test_a_client_that_disconnects_cancels_its_synthesis(server):
    cancelled = metric(server.url, "gpt_sovits_cancelled_total")
    conn = post_long_text(server, "pcm")
    reply = conn.getresponse()
    assert reply.status == 200 and len(reply.read1(4096)) > 0  # the stream has started
    assert server.app.server.worker.queue_depth == 1
    t0 = time.monotonic()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # the owner thread drops the job within one GPT step (60 sentences would take far longer)
    assert wait_idle(server, 10) < 10 and time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while metric(server.url, "gpt_sovits_cancelled_total") < cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # and it moves on to the next request
    assert parse_stream_wav(server.client().audio.speech.create(model="tts-1", voice="Doubao", input="好。",
                                                                response_format="wav").content).size > 0


def test_a_client_that_leaves_before_the_first_audio_cancels_too(server):
    """A whole-file format answers only at the end: the server watches for the disconnect meanwhile."""
    conn = post_long_text(server, "flac")
    deadline = time.monotonic() + 10
    while server.app.server.worker.queue_depth == 0:  # wait for the job to reach the queue
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # into the synthesis
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_idle(server, 10) < 10


# ------------------------------------------------------------------------------ voices


def test_voices_list_and_add_round_trip(server, tiny_dir, voices_dir):
    status, body, _ = http_get(server.url + "/v1/audio/voices")
    listing = json.loads(body)
    assert status == 200 and listing["default"] == "Doubao"
    # only voices whose files this model dir holds; the tiny dir has Doubao's
    assert listing["voices"] == [{"id": "Doubao", "name": "Doubao", "language": "zh", "source": "builtin"}]

    url = server.url + "/v1/audio/voices"
    fields = {"name": "my-voice_1", "transcript": "今天天气很好，我们去公园散步吧。", "language": "zh"}
    assert post_form(url, fields, wav_bytes(4.0)) == (201, {"id": "my-voice_1"})
    stored = voices_dir / "my-voice_1"
    assert json.loads((stored / "voice.json").read_text(encoding="utf-8"))["transcript"] == fields["transcript"]
    clip, rate = sf.read(stored / "reference.wav")
    assert rate == 16000 and abs(clip.size / rate - 4.0) < 1e-3
    listing = json.loads(http_get(url)[1])
    assert {"id": "my-voice_1", "name": "my-voice_1", "language": "zh", "source": "user"} in listing["voices"]
    # usable, by any case
    reply = server.client().audio.speech.create(model="tts-1", voice="MY-VOICE_1", input="你好。", response_format="wav")
    assert parse_stream_wav(reply.content).size > 0

    code = lambda response: (response[0], response[1]["error"]["code"])
    assert code(post_form(url, fields, wav_bytes(4.0))) == (409, "voice_exists")
    assert code(post_form(url, {**fields, "name": "doubao"}, wav_bytes(4.0))) == (409, "voice_exists")
    assert code(post_form(url, {**fields, "name": "short"}, wav_bytes(1.0))) == (400, "invalid_audio_length")
    assert code(post_form(url, {**fields, "name": "long"}, wav_bytes(12.0))) == (400, "invalid_audio_length")
    assert code(post_form(url, {**fields, "name": "junk"}, b"not audio at all" * 100)) == (400, "invalid_audio")
    assert code(post_form(url, {**fields, "name": "../evil"}, wav_bytes(4.0))) == (400, "invalid_voice_name")
    assert code(post_form(url, {**fields, "name": "nolang", "language": "xx"}, wav_bytes(4.0))) == \
        (400, "invalid_language")
    assert code(post_form(url, {**fields, "name": "noclip"}, None)) == (400, "missing_field")
    assert sorted(p.name for p in voices_dir.iterdir()) == ["my-voice_1"]  # nothing left by the refusals
    # kept across restarts: a new app over the same folder lists it
    fresh = create_app(tiny_config(tiny_dir), api_key="", voices_dir=voices_dir)
    assert fresh.server.store.get("my-voice_1") is not None


def test_health_and_metrics(server):
    status, body, headers = http_get(server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok" and "x-request-id" in {k.lower() for k in headers}
    text = http_get(server.url + "/metrics")[1].decode()
    assert "# TYPE gpt_sovits_first_audio_seconds histogram" in text
    assert metric(server.url, 'gpt_sovits_requests_total{endpoint="/v1/audio/speech",status="200"}') >= 5
    assert metric(server.url, "gpt_sovits_audio_seconds_total") > 1
    count = metric(server.url, "gpt_sovits_first_audio_seconds_count")
    assert count >= 5 and metric(server.url, 'gpt_sovits_first_audio_seconds_bucket{le="+Inf"}') == count
    assert metric(server.url, "gpt_sovits_engine_ready") == 1


# ------------------------------------------------------------------------------ loading, key, failures


class FailsMidStream(Engine):
    """The real engine, except that a text containing "BOOM" fails after its first chunk (a synthesis
    error after the response has started)."""

    def synthesize_stream(self, text, voice, options=None, **kw):
        for i, chunk in enumerate(super().synthesize_stream(text, voice, options, **kw)):
            if i == 1 and "BOOM" in text:
                raise RuntimeError("simulated failure after the first chunk")
            yield chunk


def test_api_key_loading_503_and_a_failure_mid_stream(tiny_dir, tmp_path):
    release = threading.Event()

    def slow_factory(config, registry):
        assert release.wait(60), "the test never released the engine"
        # one row, as on the CPU, on every device: synthesize_stream (overridden above) runs the jobs; the shared-
        # step path is tests/test_server_batched.py's
        return FailsMidStream(config.model_dir, registry=registry, batch_rows=1)

    running = RunningServer(create_app(tiny_config(tiny_dir), engine_factory=slow_factory, api_key=KEY,
                                       voices_dir=tmp_path / "voices", max_queue=1))
    try:
        status, body, headers = http_get(running.url + "/health")
        assert status == 503 and json.loads(body)["error"]["code"] == "engine_loading" and headers["retry-after"]
        status, err = error_of(lambda: running.client(KEY).audio.speech.create(model="m", voice="Doubao", input="好。"))
        assert status == 503 and err["code"] == "engine_loading"
        status, err = error_of(lambda: running.client().audio.speech.create(model="m", voice="Doubao", input="好。"))
        assert status == 401 and err["code"] == "invalid_api_key" and KEY not in err["message"]
        assert http_get(running.url + "/v1/audio/voices")[0] == 401
        assert http_get(running.url + "/v1/audio/voices", {"Authorization": f"Bearer {KEY}"})[0] == 200
        release.set()
        running.wait_healthy()
        client = running.client(KEY)
        assert parse_stream_wav(client.audio.speech.create(model="m", voice="Doubao", input="好。",
                                                           response_format="wav").content).size > 0
        # after the first bytes the status has gone out: the stream ends early and cleanly, and is counted
        with client.audio.speech.with_streaming_response.create(model="m", voice="Doubao", input="BOOM 你好，世界。",
                                                                response_format="pcm") as response:
            assert response.status_code == 200
            body = b"".join(response.iter_bytes())
        assert 0 < len(body) < MAX_NEW_TOKENS * SAMPLES_PER_TOKEN * 2 and len(body) % 2 == 0
        assert metric(running.url, 'gpt_sovits_synthesis_errors_total{stage="mid_stream"}') == 1
        wait_idle(running, 30)  # the client has the whole body before the owner thread has let the job go
        # max_queue=1: while one request runs, the next is refused with 429 (not queued without bound)
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
        conn.request("POST", "/v1/audio/speech", body=json.dumps({"input": LONG_TEXT, "response_format": "pcm"}),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read1(4096)
        status, err = error_of(lambda: client.audio.speech.create(model="m", voice="Doubao", input="好。"))
        assert status == 429 and err["code"] == "queue_full"
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_idle(running, 10)
        # the owner thread carries on
        assert parse_stream_wav(client.audio.speech.create(model="m", voice="Doubao", input="好。",
                                                           response_format="wav").content).size > 0
    finally:
        release.set()
        running.stop()


def test_serve_without_the_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # an import of it fails, as when it is not installed
    args = serve.argparse.Namespace(host="127.0.0.1", port=0, model_dir=None, voices_dir=None)
    assert serve.cmd_serve(args) == 2
    assert "pip install 'dora-primespeech-mlx[server]'" in capsys.readouterr().err


def test_the_default_engine_factory_is_the_real_engine(tiny_dir):
    from dora_primespeech_mlx.voices import VoiceRegistry

    registry = VoiceRegistry(tiny_dir)
    engine = make_engine(tiny_config(tiny_dir), registry)
    assert isinstance(engine, Engine) and engine.registry is registry


def test_a_bug_is_answered_as_a_json_500_with_the_request_id(server):
    """Not bad input but a fault inside a handler (here: the user voices table breaking)."""

    class Broken(dict):
        def values(self):
            raise RuntimeError("simulated bug")

    store = server.app.server.store
    voices, store.voices = store.voices, Broken(store.voices)
    try:
        status, body, headers = http_get(server.url + "/v1/audio/voices")
    finally:
        store.voices = voices
    error = json.loads(body)["error"]
    rid = {k.lower(): v for k, v in headers.items()}["x-request-id"]
    assert status == 500 and error["code"] == "internal_error" and rid in error["message"]
    assert "simulated bug" not in error["message"]
