"""Real `dora run`s on each dora-rs line the node supports: 0.3 (mofa-studio's pin 0.3.12), 0.4 (0.4.1,
what mofa-studio's Rust nodes link) and 1.x (what `pip install dora-rs` brings).

- The demo dataflow (dataflows/demo.yml) with the real engine on the oracle-built model directory,
  token caps keeping mlx-cpu short (and MLX on OpenBLAS where tests/support/flows.py can set it up).
- A dataflow whose TTS node declares neither `status` nor `log` (mofa-fm's declares no `status`):
  the node still sends both; every line drops an undeclared output (1.x and 0.4 log a warning
  "Ignoring output `status` not in node's output list.", 0.3 logs nothing) and the node must go on
  working. This one runs the real node loop with a stand-in engine (tests/support/fake_tts_node.py),
  so it costs seconds per line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support"
sys.path.insert(0, str(SUPPORT))

from dora_venv import DORA_LINES, check_line, dora_bindir  # noqa: E402
from flows import FLOW_NODE, flow_env, run_flow, with_node_command  # noqa: E402

TEXTS = ["你好，世界。", "。。", "Hello from MLX."]
LINES = list(DORA_LINES)


@pytest.mark.parametrize("line", LINES)
def test_demo_dataflow(fixtures, tmp_path, line):
    bindir = dora_bindir(line)
    check_line(line, bindir)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    # demo.yml as shipped, its helper scripts named absolutely so the copy runs from tmp_path
    flow = yaml.safe_load((ROOT / "dataflows" / "demo.yml").read_text(encoding="utf-8"))
    for node in flow["nodes"]:
        if node["path"].endswith(".py"):
            node["path"] = str(ROOT / "dataflows" / node["path"])
    yml = tmp_path / "demo.yml"
    yml.write_text(yaml.safe_dump(with_node_command(flow, bindir), allow_unicode=True), encoding="utf-8")
    env = flow_env(bindir, PRIMESPEECH_MODEL_DIR=str(fixtures.model_dir), DEMO_OUT_DIR=str(out),
                   DEMO_TEXTS=str(texts), MAX_NEW_TOKENS="4")
    proc = subprocess.run([str(bindir / "dora"), "run", str(yml)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    sent = json.loads((out / "sent.json").read_text())
    assert [s["status"] for s in sent] == ["completed", "empty", "completed"]
    events = json.loads((out / "events.json").read_text())
    completions = [e for e in events if e["input"] == "segment_complete"]
    assert sorted(e["metadata"]["question_id"] for e in completions) == [0, 1, 2]  # exactly one per text
    audio = [e for e in events if e["input"] == "audio"]
    assert sorted(e["metadata"]["question_id"] for e in audio) == [0, 2]
    for e in audio:
        assert e["arrow_type"] == "list<item: float>"
        assert e["metadata_types"]["sample_rate"] == "int" and e["metadata"]["sample_rate"] == 32000
        assert e["metadata_types"]["duration"] == "float"
        assert e["metadata_types"]["question_id"] == "int"
        assert e["metadata"]["session_status"] == "started"
        samples, rate = sf.read(out / e["wav"], dtype="float32")
        assert rate == 32000 and samples.size == e["samples"]
        assert abs(e["metadata"]["duration"] - samples.size / 32000) < 1e-6
        assert np.abs(samples).max() > 0
    statuses = [e["value"][0] for e in events if e["input"] == "status"]
    assert "ready" in statuses and "error" not in statuses


def minimal_flow(records: Path, texts: list[str]) -> dict:
    """A driver and a TTS node that declares only `audio` and `segment_complete`; the driver sends the
    next text after each `segment_complete`, and a `stats` control that makes the node log."""
    return {"nodes": [
        {"id": "driver", "path": str(FLOW_NODE),
         "env": {"FLOW_ROLE": "driver", "FLOW_NAME": "driver", "FLOW_OUT": str(records),
                 "FLOW_PLAN": str(records / "driver.plan.json")},
         "inputs": {"audio": {"source": "tts/audio", "queue_size": 100},
                    "segment_complete": {"source": "tts/segment_complete", "queue_size": 100}},
         "outputs": ["text", "control"]},
        {"id": "tts", "path": str(SUPPORT / "fake_tts_node.py"),
         "inputs": {"text": {"source": "driver/text", "queue_size": 1000},
                    "control": {"source": "driver/control", "queue_size": 10}},
         "outputs": ["audio", "segment_complete"],
         "env": {"VOICE_NAME": "Doubao", "LOG_LEVEL": "DEBUG"}},
    ]}


@pytest.mark.parametrize("line", LINES)
def test_node_works_without_status_and_log_outputs(tmp_path, line):
    bindir = dora_bindir(line)
    version = check_line(line, bindir)
    records = tmp_path / "records"
    records.mkdir()
    texts = ["你好，世界。", "。。", "stats", "Hello there, this is a test."]
    lanes = [{"output": "text", "texts": [t for t in texts if t != "stats"],
              "advance": {"input": "segment_complete"}, "metadata": "segmenter"},
             {"output": "control", "texts": ["stats"], "advance": {"input": "segment_complete"}}]
    (records / "driver.plan.json").write_text(json.dumps({"lanes": lanes, "timeout_s": 120}), encoding="utf-8")
    env = flow_env(bindir, PRIMESPEECH_MODEL_DIR=str(tmp_path / "models"))
    run = run_flow(bindir, minimal_flow(records, texts), tmp_path, env, timeout=300)
    assert run.returncode == 0, run.failure()

    driver = run.records["driver"]
    assert driver["finished"], run.failure()
    got = driver["received"]
    assert [e["value"][0] for e in got if e["input"] == "segment_complete"] == ["completed", "empty", "completed"]
    audio = [e for e in got if e["input"] == "audio"]
    assert len(audio) == 2 and all(e["samples"] > 0 for e in audio)
    assert {e["input"] for e in got} == {"audio", "segment_complete"}
    node_log = run.logs.get("tts", "")
    assert "Traceback" not in node_log and "terminate called" not in node_log, node_log[-3000:]
    assert f"dora-rs {version}" in node_log  # the node ran on this line's dora-rs, not another one
