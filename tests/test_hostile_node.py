"""Hostile input against the node (issue 18): a hypothesis campaign against the service, and a real
`dora run` that floods the node with hostile payloads, control floods and a reset storm, then needs
a normal text to be spoken; and a STOP (Ctrl-C of `dora run`) in the middle of a synthesis.

The service campaign uses the faithful fake engine of test_node_service.py (owner thread enforced,
cancellation raises). The dataflow runs use the real node on the oracle's random-weight voice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_node_service import FakeEngine, Sent

from dora_primespeech_mlx.node_config import NodeConfig
from dora_primespeech_mlx.node_service import TTSService

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from dora_venv import check_line, dora_bindir  # noqa: E402
SECRET = "s3cr3t-value-that-must-not-leak"
STATUSES = {"completed", "empty", "error", "cancelled"}

# ------------------------------------------------------------------ the service, 10,000 payloads

_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=120)
PAYLOADS = st.one_of(
    _TEXT,
    _TEXT.map(lambda t: json.dumps({"prompt": t})),
    st.integers(min_value=10**30, max_value=10**400).map(lambda n: '{"prompt": %d}' % n),
    st.text(max_size=40).map(lambda t: "VOICE:" + t + "|你好"),
    st.lists(_TEXT, max_size=6).map(lambda parts: "VOICE:CUSTOM|" + "|".join(parts)),
    st.lists(st.text(max_size=20), max_size=8).map(lambda parts: "VOICE:TRAINED|" + "|".join(parts)),
    st.sampled_from(["${HOSTILE_SECRET}/a.wav", "$HOME/x.wav", "~/../../etc/passwd", "/" + "a" * 5000 + ".wav"])
    .map(lambda p: f"VOICE:CUSTOM|{p}|提示文本|zh|你好"),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                 max_leaves=10).map(json.dumps),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n),
)
METADATA = st.dictionaries(st.sampled_from(["question_id", "session_status", "segment_index", "x"]),
                           st.one_of(st.integers(), st.text(max_size=8), st.none(), st.floats(),
                                     st.lists(st.integers(), max_size=2)), max_size=4)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    os.environ["HOSTILE_SECRET"] = SECRET
    config = NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(tmp_path_factory.mktemp("models"))})
    svc = TTSService(config, lambda cfg: FakeEngine(cfg.model_dir))
    assert svc.wait_ready(30)
    yield svc
    svc.close()


ITEM = st.tuples(PAYLOADS, METADATA, st.one_of(st.none(), st.text(max_size=30)))
PER_EXAMPLE = 10  # 1,000 examples x 10 payloads: the per-example cost of hypothesis is most of the time


@settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(items=st.lists(ITEM, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_ten_thousand_hostile_payloads_each_get_exactly_one_completion(service, items):
    for payload, metadata, control in items:
        try:
            value = pa.array([payload])
        except (UnicodeEncodeError, pa.ArrowException):  # lone surrogates: only raw bytes reach the node
            value = pa.array([payload.encode("utf-8", "surrogatepass")], pa.binary())
        service.handle_text(value, metadata)
        if control is not None:
            service.handle_control(pa.array([control]))
        assert service.wait_idle(30)
        sent = Sent()
        service.drain(sent)
        done = sent.of("segment_complete")
        assert len(done) == 1 and done[0][0][0].as_py() in STATUSES
        assert len(sent.of("audio")) <= 1
        for output_id, data, meta in sent:
            for text in [str(x) for x in data.to_pylist()] + [str(v) for v in meta.values()]:
                text.encode("utf-8")  # every outgoing string is valid UTF-8
                assert SECRET not in text and os.environ.get("HOME", "/nonexistent-home") + "/x.wav" not in text


# ------------------------------------------------------------------ a real dora run


def hostile_burst() -> list[dict]:
    """Payloads that must each get one completion and no speech (speakable hostile text is covered by
    the storm phase and the service campaign: on mlx-cpu each spoken sentence costs seconds)."""
    texts = ["😀😀🎉", "ひらがなです", "\x00\x01\x02", "。。！！", "", "   ", "\t\n", '{"prompt": null}', '{"x": 1}',
             '{"prompt": ""}', "[" * 3000, "{" * 3000, '{"prompt": "😀"}',
             "VOICE:CUSTOM|${HOSTILE_SECRET}/ref.wav|提示|zh|你好", "VOICE:CUSTOM|~/ref.wav|提示|zh|你好",
             "VOICE:CUSTOM|$HOME/ref.wav|提示|zh|你好", "VOICE:CUSTOM|/" + "a" * 5000 + ".wav|提示|zh|你好",
             "VOICE:CUSTOM|/nonexistent/\u0000.wav|提示|zh|你好", "VOICE:TRAINED|a|b|c|d|e|你好",
             "VOICE:TRAINED|/x.ckpt|/y.pth|/z.wav|提示|zh|你好", "VOICE:Nobody|😀", "VOICE:CUSTOM|/r.wav|p|xx|🎉"]
    burst: list[dict] = []
    controls = ["stats", "bogus", "", "list_voices", "\x00" * 100, "x" * 10000]
    for round_ in range(8):
        for i, text in enumerate(texts):
            burst.append({"port": "text", "payload": text})
            burst.append({"port": "control", "payload": controls[(round_ + i) % len(controls)]})
        burst.append({"port": "text", "hex": "eda080eda080"})  # lone surrogates, as raw bytes
    return burst


def run_dataflow(tmp_path: Path, model_dir: Path, plan: dict, *, stop_mark: Path | None = None,
                 bindir: Path | None = None):
    bindir = bindir or Path(sys.executable).parent
    (tmp_path / "plan.json").write_text(json.dumps(plan, ensure_ascii=False))
    yml = tmp_path / "hostile.yml"
    yml.write_text(f"""nodes:
  - id: driver
    path: {ROOT / 'tests' / 'support' / 'hostile_driver.py'}
    inputs:
      audio: {{source: tts/audio, queue_size: 1000}}
      segment_complete: {{source: tts/segment_complete, queue_size: 10000}}
      status: {{source: tts/status, queue_size: 10000}}
      log: {{source: tts/log, queue_size: 10000}}
    outputs: [text, control]
  - id: tts
    path: {bindir / 'dora-primespeech-mlx'}
    inputs:
      text: {{source: driver/text, queue_size: 10000}}
      control: {{source: driver/control, queue_size: 10000}}
    outputs: [audio, segment_complete, status, log]
    env:
      PRIMESPEECH_MODEL_DIR: "{model_dir}"
      MAX_NEW_TOKENS: "2"
      HOSTILE_SECRET: "{SECRET}"
""")
    env = dict(os.environ, HOSTILE_PLAN=str(tmp_path / "plan.json"), HOSTILE_OUT=str(tmp_path),
               PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", DORA_FINISH_DRAIN_GRACE_SECS="off")
    if stop_mark is not None:
        env["HOSTILE_STOP_MARK"] = str(stop_mark)
    return subprocess.Popen([str(bindir / "dora"), "run", str(yml)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


# mofa-studio's pin. On dora-rs 1.1 the flood hung inside dora itself, at random points: the driver's
# send_output never returned from the daemon ("entering report_output_sent", dora-rs/dora#2742's
# diagnostic) while the node sat idle waiting for input. DPM_HOSTILE_DORA_LINE=1.x runs it there.
FLOOD_LINE = os.environ.get("DPM_HOSTILE_DORA_LINE", "0.3")


def test_dora_run_survives_a_hostile_flood_and_still_speaks(fixtures, tmp_path):
    bindir = dora_bindir(FLOOD_LINE)
    check_line(FLOOD_LINE, bindir)
    burst = hostile_burst()
    storm = ["从前有一座山，山里有一座庙。" * 6, "1" * 5000, '{"prompt": 1' + "0" * 5000 + "}", "你好" * 3000]
    plan = {"burst": burst, "storm_texts": storm, "reset_storm": 20, "final": "你好，世界。"}
    proc = run_dataflow(tmp_path, fixtures.model_dir, plan, bindir=bindir)
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0 and (tmp_path / "record.json").exists(), out[-4000:]
    record = json.loads((tmp_path / "record.json").read_text())
    n_texts = sum(1 for b in burst if b["port"] == "text")
    assert record["burst_texts"] == n_texts >= 150
    completions = record["completions"]
    assert all(len(completions.get(str(i), [])) == 1 for i in range(n_texts)), \
        {i: completions.get(str(i)) for i in range(n_texts) if len(completions.get(str(i), [])) != 1}
    burst_statuses = {completions[str(i)][0]["status"] for i in range(n_texts)}
    assert burst_statuses <= {"empty", "error"}, burst_statuses  # nothing in the burst is speech
    assert [completions[f"storm{j}"][0]["status"] for j in range(len(storm))] == ["cancelled"] * len(storm)
    (final,) = completions["final"]
    assert final["status"] == "completed" and record["audio"]["final"][0] > 0
    everything = json.dumps(record, ensure_ascii=False) + out
    assert SECRET not in everything
    assert "Traceback" not in out and "terminate called" not in out and "panicked" not in out


def test_stop_in_the_middle_of_a_synthesis_ends_the_node_cleanly(fixtures, tmp_path):
    mark = tmp_path / "busy"
    long_text = "从前有一座山，山里有一座庙。" * 4
    proc = run_dataflow(tmp_path, fixtures.model_dir, {"burst": [], "final": long_text}, stop_mark=mark)
    deadline = time.monotonic() + 900
    while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert mark.exists(), "the node never reported busy"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on `dora run` sends
    out, _ = proc.communicate(timeout=240)
    stopped_in = time.monotonic() - t0
    assert stopped_in < 120, stopped_in
    assert "Traceback" not in out and "terminate called" not in out and "panicked" not in out, out[-3000:]
