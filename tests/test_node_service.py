"""The Dora protocol (node_service.py, node.py) with a fake engine and an injected send."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_primespeech_mlx.engine import MAX_PROMPTS
from dora_primespeech_mlx.node import run
from dora_primespeech_mlx.node_config import NodeConfig
from dora_primespeech_mlx.node_payload import parse_text_payload
from dora_primespeech_mlx.node_service import TTSService
from dora_primespeech_mlx.options import (
    AudioChunk,
    NothingToSpeak,
    SynthesisCancelled,
    SynthesisOptions,
    WrongThreadError,
)
from dora_primespeech_mlx.text.frontend import request_sentences
from dora_primespeech_mlx.voices import VoiceRegistry

pytestmark = pytest.mark.fast  # oracle-free and quick: part of `pytest -m fast`


class FakeEngine:
    """Test double that fails the way the real engine fails: it belongs to the thread that built it
    (any other thread gets `WrongThreadError`, as MLX work there fails on a GPU) and a cancelled
    synthesis raises `SynthesisCancelled` (the real generator does not return quietly). Yields a sine
    chunk per 4 characters and records what it was asked."""

    sample_rate = 32000

    def __init__(self, model_dir, *, delay: float = 0.0, fail_on: str | None = None, prepare_delay: float = 0.0):
        self.registry = VoiceRegistry(model_dir)
        self.prepared: list[str] = []
        self._prompts: OrderedDict = OrderedDict()
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
        key = (voice.id, voice.reference_audio, voice.prompt_text, voice.prompt_lang, voice.sovits_weights)
        if key in self._prompts:  # as the engine: prepared voices are kept, least recently used dropped
            self._prompts.move_to_end(key)
            return self._prompts[key]
        time.sleep(self.prepare_delay)
        self.prepared.append(voice.id)
        self._prompts[key] = voice.id
        while len(self._prompts) > MAX_PROMPTS:
            self._prompts.popitem(last=False)
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
        # what is spoken is decided as the engine decides it: the real (pure Python) frontend
        notes: list[str] = []
        if not list(request_sentences(text, options.text_lang or voice.text_lang, notes=notes)):
            raise NothingToSpeak(f"text {text[:60]!r} has nothing to speak ({'; '.join(notes) or 'no phones'})", notes)
        n = max(1, len(text) // 4)
        for i in range(n):
            if self._cancel.is_set() or (is_cancelled is not None and is_cancelled()):
                raise SynthesisCancelled()
            time.sleep(self.delay)
            t = np.arange(3200) / 32000
            yield AudioChunk(np.sin(2 * np.pi * 220 * t).astype(np.float32) * 0.1, 32000, 0, i, i == n - 1,
                             notes=tuple(notes) if i == 0 else ())

    def cancel(self):
        self._cancel.set()


@pytest.fixture(autouse=True)
def _no_user_home(tmp_path_factory, monkeypatch):
    """~/.dora/models/primespeech/voices.json is read for characters: tests get an empty home."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("PRIMESPEECH_VOICES_FILE", raising=False)


@pytest.fixture(autouse=True)
def _fresh_g2pw_state(monkeypatch):
    """The fake engine never configures G2PW, as a fresh node process before its engine does: no
    status to report, pypinyin readings. Engines other test files keep for their session (the real
    engine configures G2PW when it is built) must not show up in these tests' start-up logs."""
    from dora_primespeech_mlx.text import chinese, g2pw

    monkeypatch.setattr(g2pw, "_status", None)
    monkeypatch.setattr(chinese, "_polyphones", None)


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
    """Records what the node sends; refuses what Dora would (strings that are not valid UTF-8)."""

    def __call__(self, output_id, data, metadata):
        for value in (metadata or {}).values():
            if isinstance(value, str):
                value.encode("utf-8")  # raises on a lone surrogate
        self.append((output_id, data, metadata))

    def logs(self, level=None):
        out = [json.loads(d[0].as_py()) for d, _ in self.of("log")]
        return [m["message"] for m in out if level is None or m["level"] == level]

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


def test_env_overrides_voice_language_and_speed_and_the_engine_fills_the_rest(model_dir):
    # unset, they stay None for the engine to take from the voice (Maple: English, speed 1.0) ...
    options = NodeConfig.from_env({}).options
    assert (options.text_lang, options.speed, options.fragment_interval) == (None, None, None)
    assert options == SynthesisOptions()  # ... and every other default is the engine's own
    cfg = NodeConfig.from_env({"TEXT_LANG": "zh", "SPEED_FACTOR": "1.3"})
    assert (cfg.options.text_lang, cfg.options.speed) == ("zh", 1.3)
    service, engine = make_service(model_dir, {"SPEED_FACTOR": "1.3"})
    process(service, "VOICE:Maple|Hello there my friend.")
    text, voice_id, sent_options = engine.calls[-1]
    assert voice_id == "Maple" and sent_options.text_lang is None and sent_options.speed == 1.3
    service.close()


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
    assert text == "你好啊朋友" and str(clip) in voice_id and options.text_lang is None
    assert engine.voices[-1].text_lang == "auto"  # the engine speaks in the voice's language
    service.close()


def test_allowed_voice_dirs_limit_payload_files_after_links_and_dots_are_resolved(model_dir, tmp_path):
    voices, outside = tmp_path / "voices", tmp_path / "outside"
    voices.mkdir()
    outside.mkdir()
    (voices / "ok.wav").write_bytes(b"RIFF")
    (outside / "secret.wav").write_bytes(b"RIFF")
    (voices / "link.wav").symlink_to(outside / "secret.wav")
    (tmp_path / "gpt.ckpt").write_bytes(b"x")
    service, engine = make_service(model_dir, {"ALLOWED_VOICE_DIRS": f"{voices}{os.pathsep}{tmp_path}/missing"})
    (note,) = [m for m in started(service).logs("WARNING") if "ALLOWED_VOICE_DIRS" in m]
    assert "missing" in note and "not a folder" in note
    process(service, f"VOICE:CUSTOM|{voices}/ok.wav|参考文本|zh|你好啊朋友")
    assert len(engine.calls) == 1 and "ok.wav" in engine.calls[0][1]
    refused = [f"{outside}/secret.wav", f"{outside}/no-such.wav", f"{voices}/link.wav", f"{voices}/../outside/secret.wav"]
    for path in refused:
        sent = process(service, f"VOICE:CUSTOM|{path}|参考文本|zh|你好")
        (data, meta), = sent.of("segment_complete")
        # the same answer whether or not the file exists, and the allowed folders are not shown
        assert data[0].as_py() == "error" and "outside the folders" in meta["error"], meta["error"]
        assert "ALLOWED_VOICE_DIRS" in meta["error"] and str(voices) not in meta["error"].replace(path, "")
    sent = process(service, f"VOICE:TRAINED|{tmp_path}/gpt.ckpt|{voices}/x.pth|{voices}/ok.wav|参考|zh|你好")
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and "VOICE:TRAINED GPT weights" in meta["error"]
    assert "outside the folders" in meta["error"]
    assert len(engine.calls) == 1
    service.close()


def test_allowed_voice_dirs_set_to_nothing_refuses_every_payload_file(model_dir, tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    service, engine = make_service(model_dir, {"ALLOWED_VOICE_DIRS": os.pathsep})
    sent = process(service, f"VOICE:CUSTOM|{clip}|参考文本|zh|你好")
    assert "outside the folders" in sent.of("segment_complete")[0][1]["error"] and engine.calls == []
    process(service, "VOICE:Luo Xiang|你好啊")  # named voices are not payload files
    assert [c[1] for c in engine.calls] == ["Luo Xiang"]
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
    st.lists(st.text(max_size=10), max_size=7).map(lambda parts: "VOICE:TRAINED|" + "|".join(parts)),
    st.lists(st.sampled_from(["\\ud800", "\\udfff", "a", "|", "/", "VOICE:CUSTOM|", "\\u0000"]), max_size=8)
    .map(lambda parts: '{"prompt": "' + "".join(parts) + '"}'),
    st.sampled_from(["dnz", "DaNiu", "marc", "fewshot", "luoxiang", "nobody"]).map(lambda v: f"VOICE:{v}|你好"),
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


# --------------------------------------------------------- mofa-studio's configuration (VOICE_CHARACTER)

RUST_VOICES = {
    "default_voice": "doubao",
    "voices": {
        "doubao": {"ref_audio": "moyoyo/ref_audios/doubao_ref_mix_new.wav", "ref_text": "这家resturant的steak很有名",
                   "aliases": ["default"]},
        "dnz": {"ref_audio": "moyoyo/ref_audios/dnz_ref.wav", "ref_text": "今天啊", "aliases": ["daniu", "zhaodaniu"]},
        "marc": {"ref_audio": "moyoyo/ref_audios/fewshot_ref.wav", "ref_text": "Hello there, my friend.",
                 "speed_factor": 1.2, "aliases": ["fewshot"]},
    },
}


def rust_voices_file(path, base, clip=True):
    """dora-gpt-sovits-mlx's voices.json at `path`, relative clips under `base` (the marc clip made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**RUST_VOICES, "models_base_path": str(base)}))
    if clip:
        (base / "moyoyo" / "ref_audios").mkdir(parents=True, exist_ok=True)
        (base / "moyoyo" / "ref_audios" / "fewshot_ref.wav").write_bytes(b"RIFF")
    return path


def startup(sent):
    (message,) = [m for m in sent.logs("INFO") if m.startswith("startup voice")]
    return message


def started(service):
    sent = Sent()
    service.drain(sent)
    return sent


@pytest.mark.parametrize("character, voice", [
    ("dnz", "Zhao Daniu"), ("DNZ", "Zhao Daniu"), ("DaNiu", "Zhao Daniu"), ("zhaodaniu", "Zhao Daniu"),
    ("yfc", "Chen Yifan"), ("ChenYifan", "Chen Yifan"), ("luoxiang", "Luo Xiang"), ("LUO", "Luo Xiang"),
    ("doubao", "Doubao"), ("default", "Doubao"), ("yangmi", "Yang Mi"), ("mayun", "Ma Yun"), ("bys", "BYS"),
])
def test_voice_character_through_the_built_in_table(model_dir, character, voice):
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": character})
    sent = started(service)
    assert engine.warm_ups[0][0] == voice and engine.prepared[0] == voice
    message = startup(sent)
    assert f"VOICE_CHARACTER={character!r}" in message and "built-in table" in message and voice in message
    assert sent.logs("WARNING") == []
    # the same names work per request
    process(service, f"VOICE:{character}|你好世界")
    assert engine.calls[-1][1] == voice
    service.close()


def test_voice_character_through_dora_gpt_sovits_mlx_voices_json(model_dir):
    rust_voices_file(model_dir / "voices.json", model_dir)
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "FewShot"})
    sent = started(service)
    voice = engine.voices[0]  # warm-up: the startup voice
    doubao = engine.registry.get("Doubao")
    assert voice.id == "marc" and (voice.gpt_weights, voice.sovits_weights) == (doubao.gpt_weights, doubao.sovits_weights)
    assert voice.reference_audio == model_dir / "moyoyo" / "ref_audios" / "fewshot_ref.wav"
    assert (voice.prompt_text, voice.speed_factor) == ("Hello there, my friend.", 1.2)
    message = startup(sent)
    assert "VOICE_CHARACTER='FewShot'" in message and str(model_dir / "voices.json") in message and "zero-shot" in message
    assert any(m.startswith("voice characters from") and "marc" in m for m in sent.logs("INFO"))
    # a character that is one of our voices keeps its own fine-tuned weights
    process(service, "VOICE:DaNiu|大家好啊")
    assert engine.voices[-1] == engine.registry.get("Zhao Daniu")
    process(service, "VOICE:marc|hello there my friends")
    assert engine.voices[-1].id == "marc"
    service.handle_control(pa.array(["list_voices"]))
    assert any("characters of" in m and "marc" in m for m in started(service).logs("INFO"))
    service.close()


def test_voices_config_wins_over_the_model_dir_file(model_dir, tmp_path):
    rust_voices_file(model_dir / "voices.json", model_dir, clip=False)  # its marc clip is missing
    explicit = rust_voices_file(tmp_path / "cfg" / "mine.json", tmp_path / "base")
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "marc", "VOICES_CONFIG": str(explicit)})
    assert engine.voices[0].reference_audio == tmp_path / "base" / "moyoyo" / "ref_audios" / "fewshot_ref.wav"
    assert str(explicit) in startup(started(service))
    service.close()


def test_the_home_voices_json_is_read(model_dir, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    rust_voices_file(home / ".dora" / "models" / "primespeech" / "voices.json", tmp_path / "base")
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "marc"})
    assert engine.voices[0].id == "marc"
    service.close()


@pytest.mark.parametrize("content", [json.dumps(RUST_VOICES), "{corrupt", "[1, 2]", json.dumps({"voices": 3})])
def test_no_voices_json_stops_the_engine(model_dir, content):
    """Before: VoiceRegistry refused a map-shaped voices.json and the engine failed to start."""
    model_dir.mkdir(parents=True)
    (model_dir / "voices.json").write_text(content)
    service, _ = make_service(model_dir)
    sent = started(service)
    assert service.init_error is None and [d[0].as_py() for d, _ in sent.of("status")] == ["ready"]
    warnings = sent.logs("WARNING")
    if content == json.dumps(RUST_VOICES):
        assert warnings == []  # the Rust node's file: characters, nothing skipped
    else:
        assert warnings and all(str(model_dir / "voices.json") in w and "skipped" in w for w in warnings)
    assert process(service, "你好世界").of("segment_complete")[0][0][0].as_py() == "completed"
    service.close()


def test_a_bad_character_entry_is_named_and_the_rest_work(model_dir):
    data = json.loads(json.dumps(RUST_VOICES))
    data["voices"]["broken"] = {"ref_text": "no clip"}
    data["models_base_path"] = str(model_dir)
    model_dir.mkdir(parents=True)
    (model_dir / "voices.json").write_text(json.dumps(data))
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "dnz"})
    sent = started(service)
    (warning,) = sent.logs("WARNING")
    assert "'broken'" in warning and "ref_audio" in warning and str(model_dir / "voices.json") in warning
    assert engine.voices[0].id == "Zhao Daniu"
    service.close()


def test_voice_name_wins_over_voice_character_with_a_warning(model_dir):
    service, engine = make_service(model_dir, {"VOICE_NAME": "Luo Xiang", "VOICE_CHARACTER": "dnz"})
    sent = started(service)
    assert engine.voices[0].id == "Luo Xiang" and "VOICE_NAME='Luo Xiang'" in startup(sent)
    assert any("VOICE_CHARACTER='dnz'" in w and "VOICE_NAME wins" in w for w in sent.logs("WARNING"))
    service.close()


def test_unknown_character_falls_back_to_doubao_listing_known_ids(model_dir):
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "nobody"})
    sent = started(service)
    assert engine.voices[0].id == "Doubao"
    (warning,) = sent.logs("WARNING")
    assert "VOICE_CHARACTER='nobody'" in warning and "dnz" in warning and "Luo Xiang" in warning
    assert sent.logs("ERROR") == []
    service.close()
    # a wrong VOICE_NAME stays an error, as it was
    service, engine = make_service(model_dir, {"VOICE_NAME": "nobody"})
    assert engine.voices[0].id == "Doubao" and any("VOICE_NAME='nobody'" in m for m in started(service).logs("ERROR"))
    service.close()


def test_mofa_id_without_a_built_in_voice_says_so(model_dir):
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "marc"})
    sent = started(service)
    assert engine.voices[0].id == "Doubao"
    (warning,) = sent.logs("WARNING")
    assert "no built-in voice" in warning and "Marc" in warning and "voices.json" in warning
    sent = process(service, "VOICE:fewshot|hello there")
    assert engine.calls[-1][1] == "Doubao" and any("no built-in voice" in w for w in sent.logs("WARNING"))
    service.close()


def test_character_whose_clip_is_missing(model_dir):
    rust_voices_file(model_dir / "voices.json", model_dir, clip=False)
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "marc"})
    sent = started(service)
    assert engine.voices[0].id == "Doubao" and any("fewshot_ref.wav" in w for w in sent.logs("WARNING"))
    # per request: an error that names neither the clip's path nor the model dir
    sent = process(service, "VOICE:marc|hello there")
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and meta["error_stage"] == "voice" and "'marc'" in meta["error"]
    assert str(model_dir) not in meta["error"] and "fewshot_ref" not in meta["error"]
    service.close()


def test_ref_audio_and_ref_text_set_the_startup_reference(model_dir, tmp_path):
    clip = tmp_path / "me.wav"
    clip.write_bytes(b"RIFF")
    service, engine = make_service(model_dir, {"VOICE_CHARACTER": "dnz", "REF_AUDIO": str(clip), "REF_TEXT": "我的声音"})
    voice = engine.voices[0]
    assert (voice.id, voice.reference_audio, voice.prompt_text) == ("Zhao Daniu", clip, "我的声音")
    assert voice.gpt_weights == engine.registry.get("Zhao Daniu").gpt_weights
    assert "REF_AUDIO" in startup(started(service))
    assert engine.registry.get("Zhao Daniu").reference_audio != clip  # the registry is unchanged
    service.close()
    # a missing clip: the voice keeps its own clip and transcript
    service, engine = make_service(model_dir, {"REF_AUDIO": str(tmp_path / "nope.wav"), "REF_TEXT": "x"})
    assert engine.voices[0] == engine.registry.get("Doubao")
    assert any("REF_AUDIO" in w for w in started(service).logs("WARNING"))
    service.close()
    # REF_TEXT alone replaces the transcript; PROMPT_TEXT wins over it
    service, engine = make_service(model_dir, {"REF_TEXT": "甲", "PROMPT_TEXT": "乙"})
    assert engine.voices[0].prompt_text == "乙"
    assert any("PROMPT_TEXT wins" in w for w in started(service).logs("WARNING"))
    service.close()


def test_variables_of_other_nodes_are_named_in_one_warning(model_dir):
    env = {name: "x" for name in ("T2S_WEIGHTS", "VITS_WEIGHTS", "USE_MLX_VITS", "RUST_LOG", "GPT_SOVITS_MODEL_DIR",
                                  "CODES_PATH", "SYNTHESIS_TIMEOUT_SECS", "FRAGMENT_MIN_CHARS", "USE_GPU", "DEVICE")}
    service, _ = make_service(model_dir, env)
    ignored = [w for w in started(service).logs("WARNING") if "ignored" in w]
    assert len(ignored) == 1 and all(name in ignored[0] for name in env)
    service.close()


def test_g2pw_state_is_on_the_log_output(model_dir):
    from dora_primespeech_mlx.text.g2pw import configure_g2pw

    config = NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(model_dir)})

    def factory(cfg):  # as Engine.__init__ does
        configure_g2pw(cfg.model_dir)
        return FakeEngine(cfg.model_dir)

    service = TTSService(config, factory)
    assert service.wait_ready(30)
    (warning,) = [w for w in started(service).logs("WARNING") if "G2PW" in w]
    assert "pypinyin" in warning and "G2PWModel" in warning
    service.close()


# -------------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("text", ["😀😀", "🎉 ♪ ★", "Привет", "~~~ ###", "ａｂｃ"])
@pytest.mark.parametrize("streaming", [False, True])
def test_text_without_phones_gets_a_short_silence_then_empty(model_dir, text, streaming):
    service, engine = make_service(model_dir, {"RETURN_FRAGMENT": str(streaming)})
    sent = process(service, text, {"question_id": 9, "session_status": "started"})
    (data, meta), = sent.of("audio")
    samples = data[0].values.to_numpy()
    assert data.type == pa.list_(pa.float32()) and samples.size == 6400 and not samples.any()
    assert meta["sample_rate"] == 32000 and meta["duration"] == pytest.approx(0.2)
    assert (meta["question_id"], meta["session_status"]) == (9, "started")
    if streaming:
        assert (meta["segment_index"], meta["is_final"]) == (0, True)
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["empty"]
    assert [o for o, _, _ in sent if o in ("audio", "segment_complete")] == ["audio", "segment_complete"]
    assert [c[0] for c in engine.calls] == [text]  # the engine decides, once; its NothingToSpeak is answered
    assert sent.logs("WARNING") == [] and any("nothing to speak" in m for m in sent.logs("INFO"))
    service.close()


@pytest.mark.parametrize("text", ["你好😀", "😀 hello", "😀 42", "①"])
def test_text_with_something_to_speak_is_synthesised(model_dir, text):
    service, engine = make_service(model_dir)
    sent = process(service, text)
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"] and engine.calls
    service.close()


@pytest.mark.parametrize("payload", ['{"text": "hello"}', "{}", '{"prompt": ""}', '{"prompt": null}'])
def test_json_object_without_a_prompt_speaks_nothing(model_dir, payload):
    service, _ = make_service(model_dir)
    sent = process(service, payload)
    assert sent.of("audio") == [] and [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["empty"]
    service.close()


def test_a_5000_digit_integer_prompt_does_not_crash(model_dir):
    service, engine = make_service(model_dir)
    digits = "9" * 5000
    assert parse_text_payload('{"prompt": ' + digits + "}").text == digits
    sent = process(service, '{"prompt": ' + digits + "}")
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    assert engine.calls[-1][0] == digits
    service.close()


def test_voice_trained_uses_its_own_weights_and_reference(model_dir, tmp_path):
    files = {name: tmp_path / name for name in ("me.ckpt", "me.pth", "ref.wav")}
    for path in files.values():
        path.write_bytes(b"x")
    service, engine = make_service(model_dir)
    payload = f"VOICE:TRAINED|{files['me.ckpt']}|{files['me.pth']}|{files['ref.wav']}|参考文本|zh|你好，世界"
    sent = process(service, json.dumps({"prompt": payload}))
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    voice = engine.voices[-1]
    assert (voice.gpt_weights, voice.sovits_weights, voice.reference_audio) == (
        files["me.ckpt"], files["me.pth"], files["ref.wav"])
    assert (voice.prompt_text, voice.prompt_lang, engine.calls[-1][0]) == ("参考文本", "zh", "你好，世界")
    assert engine.calls[-1][2].speed is None and voice.speed_factor == 1.1  # the engine takes the voice's
    for bad, needle in [
        (f"VOICE:TRAINED|{files['ref.wav']}|{files['me.pth']}|{files['ref.wav']}|p|zh|你好", ".ckpt"),
        (f"VOICE:TRAINED|{tmp_path}/no.ckpt|{files['me.pth']}|{files['ref.wav']}|p|zh|你好", "no.ckpt"),
        (f"VOICE:TRAINED|~/me.ckpt|{files['me.pth']}|{files['ref.wav']}|p|zh|你好", "absolute"),
    ]:
        (data, meta), = process(service, bad).of("segment_complete")
        assert data[0].as_py() == "error" and meta["error_stage"] == "voice" and needle in meta["error"]
    assert parse_text_payload("VOICE:TRAINED|a|b|c").text == "VOICE:TRAINED|a|b|c"  # wrong part count
    service.close()


@pytest.mark.parametrize("ref", [
    "/" + "a" * 5000 + ".wav",
    "/tmp/" + ("d" * 200 + "/") * 30 + "x.wav",
    "/tmp/\\ud800clip.wav",  # a lone surrogate, through a JSON escape
    "${HOME}/clip.wav",
    "/tmp/${HOME}/clip.wav",
    "~/clip.wav",
    "$PRIMESPEECH_MODEL_DIR/x.wav",
    "relative/clip.wav",
])
def test_hostile_custom_paths_give_a_clear_error(model_dir, ref):
    import os

    service, engine = make_service(model_dir)
    payload = '{"prompt": "VOICE:CUSTOM|' + ref + '|参考文本|zh|你好世界"}'
    service.handle_text(pa.array([payload]), {"question_id": 3})  # never raises
    assert service.wait_idle(30)
    sent = Sent()
    service.drain(sent)  # refuses strings that are not valid UTF-8
    (data, meta), = sent.of("segment_complete")
    assert data[0].as_py() == "error" and meta["error_stage"] == "voice" and meta["question_id"] == 3
    assert "VOICE:CUSTOM" in meta["error"] and len(meta["error"]) < 400
    assert os.environ["HOME"] not in meta["error"] and str(model_dir) not in meta["error"]
    assert engine.calls == []
    service.close()


def test_engine_errors_do_not_echo_the_model_dir(model_dir):
    def broken(cfg):
        raise FileNotFoundError(f"{cfg.model_dir}/moyoyo/GPT_weights/doubao-mixed.ckpt not found")

    service = TTSService(NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(model_dir)}), broken)
    assert service.wait_ready(30)
    (_, meta), = process(service, "你好").of("segment_complete")
    assert "$PRIMESPEECH_MODEL_DIR/moyoyo/GPT_weights/doubao-mixed.ckpt" in meta["error"]
    assert str(model_dir) not in meta["error"]
    service.close()
    # a synthesis error's log line about a request is redacted too (stderr keeps the full paths)
    service, engine = make_service(model_dir)

    def fail(*a, **k):
        engine._check_thread("synthesize_stream")
        raise RuntimeError(f"cannot read {model_dir}/moyoyo/x.pth (home {os.environ['HOME']})")

    engine.synthesize_stream = fail
    sent = process(service, "这是坏的句子")
    (message,) = sent.logs("ERROR")
    assert str(model_dir) not in message and os.environ["HOME"] not in message
    assert "$PRIMESPEECH_MODEL_DIR/moyoyo/x.pth" in message and "(home ~)" in message
    assert service._redact(f"{model_dir}x/a.wav {model_dir}") == f"{model_dir}x/a.wav $PRIMESPEECH_MODEL_DIR"
    service.close()


def test_surrogates_in_metadata_and_text_are_replaced(model_dir):
    service, _ = make_service(model_dir)
    sent = process(service, '{"prompt": "VOICE:nob\\udc80dy|hello there"}', {"question_id": "q\udc80", "session_status": "s\ud800"})
    (_, meta), = sent.of("segment_complete")
    assert meta["question_id"] == "q\ufffd" and meta["session_status"] == "s\ufffd"
    assert any("nob\ufffddy" in w for w in sent.logs("WARNING"))
    service.close()


# ------------------------------------------------------------------------------ environment


@pytest.mark.parametrize("name, default", [
    ("TEMPERATURE", 1.0), ("TOP_P", 1.0), ("NOISE_SCALE", 0.5), ("REPETITION_PENALTY", 1.35), ("SPEED_FACTOR", None),
    ("FRAGMENT_INTERVAL", None),
])
@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "1e999", "Infinity"])
def test_non_finite_numbers_fall_back_with_a_note(name, default, raw):
    cfg = NodeConfig.from_env({name: raw})
    assert getattr(cfg, name.lower()) == default
    assert any(name in note and "invalid" in note for note in cfg.notes)


@pytest.mark.parametrize("raw, seed, noted", [
    ("-1", None, False), ("0", 0, False), (str(2**32 - 1), 2**32 - 1, False), ("-2", 233333, True),
    (str(2**32), 233333, True), ("9" * 5000, 233333, True), ("1.5", 233333, True),
])
def test_seed_values(raw, seed, noted):
    cfg = NodeConfig.from_env({"SEED": raw})
    assert cfg.seed == seed and cfg.options.seed == seed
    assert any("SEED" in n for n in cfg.notes) == noted


def test_voice_character_config():
    cfg = NodeConfig.from_env({"VOICE_CHARACTER": " dnz ", "VOICES_CONFIG": "~/v.json", "REF_AUDIO": "/a.wav",
                               "REF_TEXT": " 文本 "})
    assert (cfg.voice_name, cfg.voice_source) == ("dnz", "VOICE_CHARACTER")
    assert cfg.voices_config.name == "v.json" and "~" not in str(cfg.voices_config)
    assert (str(cfg.ref_audio), cfg.ref_text) == ("/a.wav", "文本")
    cfg = NodeConfig.from_env({"VOICE_NAME": "Luo Xiang", "VOICE_CHARACTER": "dnz"})
    assert (cfg.voice_name, cfg.voice_source) == ("Luo Xiang", "VOICE_NAME") and any("VOICE_NAME wins" in n for n in cfg.notes)
    assert (NodeConfig.from_env({}).voice_name, NodeConfig.from_env({}).voice_source) == ("Doubao", "default")


def test_engine_nothing_to_speak_is_silence_then_empty_and_skip_notes_are_logged(model_dir):
    service, _ = make_service(model_dir)
    sent = process(service, "ひらがなです。", {"question_id": 4})
    (audio, meta), = sent.of("audio")
    assert meta["question_id"] == 4 and 0 < len(audio[0]) and not np.any(audio[0].values.to_numpy())
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["empty"]
    assert service.stats["errors"] == 0
    sent = process(service, "你好，朋友。ひらがなです。再见了，朋友们。")
    assert [d[0].as_py() for d, _ in sent.of("segment_complete")] == ["completed"]
    warnings = [json.loads(d[0].as_py()) for d, _ in sent.of("log")]
    assert any(w["level"] == "WARNING" and "skipped" in w["message"] for w in warnings)
    service.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the test
def test_a_dead_owner_thread_ends_the_node_non_zero_after_answering(model_dir, monkeypatch):
    """If the MLX owner thread dies anyway (a BaseException escaping a request), no MLX work moves to
    another thread: the loop answers what is pending with `error`, logs an ERROR and returns 1."""
    service, engine = make_service(model_dir, delay=0.05)

    def die(*a, **k):
        raise SystemExit("simulated death of the owner thread")

    monkeypatch.setattr(service, "_run_job", die)
    node = FakeNode([{"type": "INPUT", "id": "text", "value": pa.array(["你好世界你好世界"]), "metadata": {"question_id": 1}}]
                    + [{"type": "ERROR", "error": "Timeout event stream error"}] * 200)
    assert run(node, service) == 1
    done = [(m["question_id"], d[0].as_py()) for d, m in node.sent.of("segment_complete")]
    assert done == [(1, "error")]
    assert any("owner thread died" in json.loads(d[0].as_py())["message"] for d, _ in node.sent.of("log"))
    assert engine.threads <= {"mlx-owner"}
