"""The Dora protocol (node_service.py, node.py) with a fake engine and an injected send."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_primespeech_mlx.node import run
from dora_primespeech_mlx.node_service import NodeConfig, TTSService, parse_text_payload
from dora_primespeech_mlx.options import AudioChunk, SynthesisCancelled, WrongThreadError
from dora_primespeech_mlx.voices import VoiceRegistry


class FakeEngine:
    """Test double that fails the way the real engine fails: it belongs to the thread that built it
    (any other thread gets `WrongThreadError`, as MLX work there fails on a GPU) and a cancelled
    synthesis raises `SynthesisCancelled` (the real generator does not return quietly). Yields a sine
    chunk per 4 characters and records what it was asked."""

    sample_rate = 32000

    def __init__(self, model_dir, *, delay: float = 0.0, fail_on: str | None = None, prepare_delay: float = 0.0):
        self.registry = VoiceRegistry(model_dir)
        self.prepared: list[str] = []
        self.streaming: list[bool] = []
        self.calls: list[tuple[str, str, object]] = []
        self.voices: list = []  # the Voice objects of warm_up and each synthesis
        self.warm_ups: list[tuple[str, object, bool]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.prepare_delay = prepare_delay
        self.fail_on = fail_on
        self._cancel = threading.Event()
        self._owner = threading.current_thread()

    def _check_thread(self, what):
        self.threads.add(threading.current_thread().name)
        if threading.current_thread() is not self._owner:
            raise WrongThreadError(f"{what} off the owner thread")

    def prepare_voice(self, voice):
        self._check_thread("prepare_voice")
        time.sleep(self.prepare_delay)
        self.prepared.append(voice.id)
        return voice.id

    def warm_up(self, voice, options=None, *, streaming=False):
        self._check_thread("warm_up")
        self.warm_ups.append((voice.id, options, streaming))
        self.voices.append(voice)

    def synthesize_stream(self, text, voice, options, *, streaming=True, is_cancelled=None):
        self._check_thread("synthesize_stream")
        self._cancel.clear()
        self.calls.append((text, voice.id, options))
        self.voices.append(voice)
        self.streaming.append(streaming)
        if self.fail_on and self.fail_on in text:
            raise RuntimeError("boom")
        n = max(1, len(text) // 4)
        for i in range(n):
            if self._cancel.is_set() or (is_cancelled is not None and is_cancelled()):
                raise SynthesisCancelled()
            time.sleep(self.delay)
            t = np.arange(3200) / 32000
            yield AudioChunk(np.sin(2 * np.pi * 220 * t).astype(np.float32) * 0.1, 32000, 0, i, i == n - 1)

    def cancel(self):
        self._cancel.set()


@pytest.fixture(autouse=True)
def _no_user_home(tmp_path_factory, monkeypatch):
    """~/.dora/models/primespeech/voices.json is read for characters: tests get an empty home."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("PRIMESPEECH_VOICES_FILE", raising=False)


@pytest.fixture
def model_dir(tmp_path):
    return tmp_path / "models"


def make_service(model_dir, env=None, **engine_kw):
    env = {"PRIMESPEECH_MODEL_DIR": str(model_dir), **(env or {})}
    config = NodeConfig.from_env(env)
    engines = []

    def factory(cfg):
        engines.append(FakeEngine(cfg.model_dir, **engine_kw))
        return engines[-1]

    service = TTSService(config, factory)
    assert service.wait_ready(30)
    return service, engines[0]


class Sent(list):
    def __call__(self, output_id, data, metadata):
        self.append((output_id, data, metadata))

    def of(self, output_id):
        return [(d, m) for o, d, m in self if o == output_id]


def process(service, value, metadata=None):
    service.handle_text(pa.array([value]) if isinstance(value, str) else value, metadata)
    assert service.wait_idle(30)
    sent = Sent()
    service.drain(sent)
    return sent


# ------------------------------------------------------------------------------------ config


def test_config_defaults_are_primespeech_effective_values():
    cfg = NodeConfig.from_env({})
    assert (cfg.voice_name, cfg.top_k, cfg.top_p, cfg.temperature, cfg.repetition_penalty) == ("Doubao", 5, 1.0, 1.0, 1.35)
    assert cfg.seed == 233333 and cfg.return_fragment is False and cfg.text_lang is None


def test_config_bad_values_fall_back_with_a_note():
    cfg = NodeConfig.from_env({"TOP_K": "abc", "TOP_P": "7", "SPEED_FACTOR": "-1", "TEXT_LANG": "ja",
                               "LOG_LEVEL": "loud", "RETURN_FRAGMENT": "maybe", "USE_GPU": "true"})
    assert (cfg.top_k, cfg.top_p, cfg.speed_factor, cfg.text_lang, cfg.log_level) == (5, 1.0, None, None, "INFO")
    joined = "\n".join(cfg.notes)
    for name in ("TOP_K", "TOP_P", "SPEED_FACTOR", "TEXT_LANG", "LOG_LEVEL", "RETURN_FRAGMENT", "USE_GPU"):
        assert name in joined


def test_config_expands_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MYMODELS", str(tmp_path))
    assert NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": "$MYMODELS/x"}).model_dir == tmp_path / "x"


def test_env_overrides_voice_language_and_speed(model_dir):
    reg = VoiceRegistry(model_dir)
    maple = reg.get("Maple")
    assert NodeConfig.from_env({}).options_for(maple).text_lang == "en"
    assert NodeConfig.from_env({}).options_for(maple).speed == 1.0
    cfg = NodeConfig.from_env({"TEXT_LANG": "zh", "SPEED_FACTOR": "1.3"})
    assert (cfg.options_for(maple).text_lang, cfg.options_for(maple).speed) == ("zh", 1.3)


# ----------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "raw, text, voice, custom",
    [
        ("你好", "你好", None, None),
        ('{"prompt": "hello"}', "hello", None, None),
        ('{"prompt": null}', "", None, None),
        ('{"other": 1}', "", None, None),  # an object without "prompt": nothing to speak (upstream too)
        ('{"prompt": 12}', "12", None, None),
        ('{"prompt": 1.50}', "1.50", None, None),
        ('{"prompt": true}', "true", None, None),
        ('{"prompt": "a\\ud800b"}', "a\ufffdb", None, None),  # a lone surrogate escape
        ('{"prompt": "unterminated', '{"prompt": "unterminated', None, None),
        ("123", "123", None, None),
        ("true", "true", None, None),
        ("null", "null", None, None),
        ("[1]", "[1]", None, None),
        ("VOICE:Luo Xiang|你好", "你好", "Luo Xiang", None),
        ("VOICE: Maple |hi|there", "hi|there", "Maple", None),
        ('{"prompt": "VOICE:Trump|great"}', "great", "Trump", None),
        ("VOICE:CUSTOM|/a/b.wav|参考|zh|目标", "目标", None, ("/a/b.wav", "参考", "zh")),
        ("VOICE:CUSTOM|/a/b.wav|only", "VOICE:CUSTOM|/a/b.wav|only", None, None),
    ],
)
def test_parse_text_payload(raw, text, voice, custom):
    req = parse_text_payload(raw)
    assert (req.text, req.voice_id, req.custom) == (text, voice, custom)


# ---------------------------------------------------------------------------------- handlers


def test_one_audio_then_one_completion_with_metadata_types(model_dir):
    service, engine = make_service(model_dir)
    sent = process(service, "你好世界，今天天气不错。", {"question_id": 7, "session_status": "started"})
    audio = sent.of("audio")
    assert len(audio) == 1
    data, meta = audio[0]
    assert data.type == pa.list_(pa.float32()) and len(data) == 1
    samples = data[0].values.to_numpy()
    assert samples.dtype == np.float32 and samples.size == 3200 * 3
    assert type(meta["sample_rate"]) is int and meta["sample_rate"] == 32000
    assert type(meta["duration"]) is float and meta["duration"] == pytest.approx(0.3)
    assert meta["question_id"] == 7 and meta["session_status"] == "started"
    done = sent.of("segment_complete")
    assert [d[0].as_py() for d, _ in done] == ["completed"]
    assert [o for o, _, _ in sent if o in ("audio", "segment_complete")] == ["audio", "segment_complete"]
    assert engine.calls[0][1] == "Doubao" and engine.streaming == [False]
    service.close()


def test_defaults_for_missing_metadata(model_dir):
    service, _ = make_service(model_dir)
    sent = process(service, "hello there")
    _, meta = sent.of("segment_complete")[0]
    assert meta["question_id"] == "default" and meta["session_status"] == "unknown"
    service.close()


@pytest.mark.parametrize("text", ["", "   ", "。。！", "?!,", "“”\n"])
def test_empty_text_gives_exactly_one_completion_and_no_audio(model_dir, text):
    service, engine = make_service(model_dir)
    sent = process(service, text)
    assert sent.of("audio") == []
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["empty"]
    assert engine.calls == []
    service.close()


def test_voice_switch_and_unknown_voice(model_dir):
    service, engine = make_service(model_dir)
    process(service, "VOICE:Luo Xiang|大家好啊")
    sent = process(service, "VOICE:Nobody|hello there")
    assert [c[1] for c in engine.calls] == ["Luo Xiang", "Doubao"]
    assert any("unknown voice 'Nobody'" in json.loads(d[0].as_py())["message"] for d, _ in sent.of("log"))
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    # voices are prepared once each and encoders are never reloaded (one engine)
    process(service, "VOICE:Luo Xiang|再来一次")
    assert engine.prepared.count("Luo Xiang") == 1
    service.close()


def test_custom_voice_missing_clip_is_an_error_naming_the_file(model_dir, tmp_path):
    service, engine = make_service(model_dir)
    sent = process(service, f"VOICE:CUSTOM|{tmp_path}/nope.wav|参考文本|zh|你好")
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and "nope.wav" in meta["error"] and meta["session_status"] == "error"
    assert engine.calls == []
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    process(service, f"VOICE:CUSTOM|{clip}|参考文本|xx|你好啊朋友")
    text, voice_id, options = engine.calls[-1]
    assert text == "你好啊朋友" and str(clip) in voice_id and options.text_lang == "auto"
    service.close()


def test_streaming_mode_sends_chunks_with_index_and_final_flag(model_dir):
    service, engine = make_service(model_dir, {"RETURN_FRAGMENT": "true"})
    sent = process(service, "一二三四五六七八九十一二", {"question_id": "q"})
    audio = sent.of("audio")
    assert len(audio) == 3
    assert [m["segment_index"] for _, m in audio] == [0, 1, 2]
    assert [m["is_final"] for _, m in audio] == [False, False, True]
    assert sent.of("segment_complete")[0][0][0].as_py() == "completed"
    assert engine.streaming == [True]
    service.close()


def test_engine_failure_is_reported_and_the_node_continues(model_dir):
    service, _ = make_service(model_dir, fail_on="坏")
    sent = process(service, "这是坏的句子")
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and meta["error_stage"] == "synthesis" and "boom" in meta["error"]
    assert sent.of("audio") == []
    sent = process(service, "这是好的句子")
    assert sent.of("segment_complete")[0][0][0].as_py() == "completed"
    service.close()


def test_init_failure_keeps_node_alive_and_answers_each_text(model_dir):
    def broken(cfg):
        raise FileNotFoundError(f"{cfg.model_dir}/moyoyo/GPT_weights/doubao-mixed.ckpt not found")

    service = TTSService(NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(model_dir)}), broken)
    assert service.wait_ready(30)
    sent = Sent()
    service.drain(sent)
    assert [d[0].as_py() for d, _ in sent.of("status")] == ["error"]
    assert "doubao-mixed.ckpt" in json.loads(sent.of("log")[0][0][0].as_py())["message"]
    for text in ("one", "two"):
        out = process(service, text)
        (data, meta), = out.of("segment_complete")
        assert data[0].as_py() == "error" and meta["error_stage"] == "init"
    service.close()


def test_cancel_stops_running_and_pending_requests(model_dir):
    service, engine = make_service(model_dir, delay=0.05)
    service.handle_text(pa.array(["很长的一段文字" * 20]), {"question_id": 1})
    service.handle_text(pa.array(["第二段文字" * 5]), {"question_id": 2})
    time.sleep(0.15)
    t0 = time.perf_counter()
    service.handle_control(pa.array(["cancel"]))
    assert service.wait_idle(5)
    assert time.perf_counter() - t0 < 1.0
    sent = Sent()
    service.drain(sent)
    statuses = [(m["question_id"], d[0].as_py()) for d, m in sent.of("segment_complete")]
    assert statuses == [(1, "cancelled"), (2, "cancelled")]
    assert sent.of("audio") == []
    service.close()


def test_stats_and_list_voices_and_log_level(model_dir):
    service, _ = make_service(model_dir, {"LOG_LEVEL": "INFO"})
    process(service, "hello there")
    service.handle_control(pa.array(["stats"]))
    service.handle_control(pa.array(["list_voices"]))
    sent = Sent()
    service.drain(sent)
    messages = [json.loads(d[0].as_py())["message"] for d, _ in sent.of("log")]
    assert any(m.startswith("stats: 1 syntheses") for m in messages)
    assert any("Luo Xiang" in m and "Trump" in m for m in messages)
    assert all(json.loads(d[0].as_py())["level"] != "DEBUG" for d, _ in sent.of("log"))
    service.close()


HOSTILE_ARRAYS = [
    pa.array([1]), pa.array([None], pa.string()), pa.array([], pa.string()), pa.array([b"\xff\xfe"]),
    pa.array([[1.0, 2.0]]), pa.array([{"prompt": "x"}]), pa.array([3.5]), pa.array([True]),
]


@pytest.mark.parametrize("value", HOSTILE_ARRAYS, ids=lambda a: str(a.type))
def test_wrong_arrow_types_never_crash(model_dir, value):
    service, _ = make_service(model_dir)
    sent = process(service, value)
    assert len(sent.of("segment_complete")) == 1
    service.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.text(max_size=200),
    st.text(max_size=20).map(lambda t: json.dumps({"prompt": t})),
    st.text(max_size=20).map(lambda t: "VOICE:" + t),
    st.lists(st.text(max_size=10), max_size=5).map(lambda parts: "VOICE:CUSTOM|" + "|".join(parts)),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=8).map(json.dumps),
), metadata=st.dictionaries(st.sampled_from(["question_id", "session_status", "segment_index", "x"]),
                            st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2)),
                            max_size=4))
def test_hostile_payloads_yield_exactly_one_completion(tmp_path_factory, payload, metadata):
    service, _ = make_service(tmp_path_factory.mktemp("m"))
    sent = process(service, payload, metadata)
    assert len(sent.of("segment_complete")) == 1
    assert len(sent.of("audio")) <= 1
    service.close()


def test_huge_text_is_handled(model_dir):
    service, _ = make_service(model_dir)
    sent = process(service, "很长" * 5000)
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    service.close()


# ---------------------------------------------------------------------------------- the loop


class FakeNode:
    """Stands in for dora.Node: events from a list (timeouts included), sends recorded."""

    def __init__(self, events):
        self.events = list(events)
        self.sent = Sent()

    def next(self, timeout=None):
        if not self.events:
            return None
        return self.events.pop(0)

    def send_output(self, output_id, data, metadata=None):
        self.sent(output_id, data, metadata)


def test_run_loop_finishes_queued_texts_after_inputs_close(model_dir):
    service, _ = make_service(model_dir)
    timeout = {"type": "ERROR", "error": "Timeout event stream error: Receiver timed out"}
    events = [
        {"type": "INPUT", "id": "text", "value": pa.array(["第一句话说完了"]), "metadata": {"question_id": 1}},
        timeout,
        {"type": "INPUT", "id": "text", "value": pa.array(["第二句话也说完了"]), "metadata": {"question_id": 2}},
        {"type": "INPUT", "id": "control", "value": pa.array(["stats"]), "metadata": {}},
        {"type": "INPUT_CLOSED", "id": "text"},
        {"type": "STOP", "id": "ALL_INPUTS_CLOSED"},
    ]
    node = FakeNode(events)
    assert run(node, service) == 0
    done = [(m["question_id"], d[0].as_py()) for d, m in node.sent.of("segment_complete")]
    assert done == [(1, "completed"), (2, "completed")]
    assert len(node.sent.of("audio")) == 2
    statuses = [d[0].as_py() for d, _ in node.sent.of("status")]
    assert statuses[0] == "ready" and statuses[-1] == "idle"


# ------------------------------------------------------------------------- one MLX owner thread


def test_every_engine_call_runs_on_one_owner_thread_not_the_dora_thread(model_dir):
    """Engine built, startup voice prepared, warmed up and every request served on `mlx-owner`; the
    thread that calls handle_text/handle_control (Dora's) never reaches the engine's MLX methods."""
    service, engine = make_service(model_dir, {"TOP_K": "3", "TEMPERATURE": "0.7", "RETURN_FRAGMENT": "1"})
    process(service, "VOICE:Luo Xiang|大家好啊")
    process(service, "hello there")
    service.handle_control(pa.array(["stats"]))
    service.handle_control(pa.array(["list_voices"]))
    service.close()
    assert engine.threads == {"mlx-owner"} and engine._owner.name == "mlx-owner"
    assert threading.current_thread().name not in engine.threads
    # warm-up saw the node's configured sampling settings and streaming mode
    (voice_id, options, streaming), = engine.warm_ups
    assert voice_id == "Doubao" and (options.top_k, options.temperature) == (3, 0.7) and streaming is True


def test_requests_sent_while_the_engine_loads_wait_for_it(model_dir):
    config = NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(model_dir)})
    release = threading.Event()

    def slow_factory(cfg):
        release.wait(10)
        return FakeEngine(cfg.model_dir)

    service = TTSService(config, slow_factory)
    service.handle_text(pa.array(["你好世界"]), {"question_id": 1})
    service.handle_control(pa.array(["list_voices"]))  # answered while loading
    assert not service.ready
    release.set()
    assert service.wait_idle(30)
    sent = Sent()
    service.drain(sent)
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    assert len(sent.of("audio")) == 1
    service.close()


def test_reset_during_synthesis_and_voice_preparation_gives_cancelled(model_dir):
    service, engine = make_service(model_dir, delay=0.05)
    service.handle_text(pa.array(["很长的一段文字" * 20]), {"question_id": 1})
    time.sleep(0.2)
    service.handle_control(pa.array(["reset"]))
    assert service.wait_idle(5)
    sent = Sent()
    service.drain(sent)
    assert [(m["question_id"], d[0].as_py()) for d, m in sent.of("segment_complete")] == [(1, "cancelled")]
    assert service.stats["errors"] == 0 and service.stats["cancelled"] == 1
    # a reset while a new voice is being prepared (before any synthesis started)
    engine.prepare_delay = 0.5
    service.handle_text(pa.array(["VOICE:Trump|hello there my friends"]), {"question_id": 2})
    time.sleep(0.2)
    service.handle_control(pa.array(["reset"]))
    assert service.wait_idle(5)
    sent = Sent()
    service.drain(sent)
    assert [(m["question_id"], d[0].as_py()) for d, m in sent.of("segment_complete")] == [(2, "cancelled")]
    assert engine.calls[-1][1] != "Trump"  # synthesis never started
    service.close()


def test_the_owner_thread_survives_a_failing_request_handler(model_dir, monkeypatch):
    service, _ = make_service(model_dir)

    def broken(*a, **k):
        raise KeyError("handler bug")

    monkeypatch.setattr(service, "_resolve_voice", broken)
    sent = process(service, "第一句")
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and "handler bug" in meta["error"]
    monkeypatch.undo()
    sent = process(service, "第二句话")
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    service.close()
