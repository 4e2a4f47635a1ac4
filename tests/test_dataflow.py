"""A real `dora run` of the demo dataflow on the oracle-built model directory.

Runs with the dora-rs of the test environment (current 1.x) and with 0.3.12, the version
mofa-studio pins. Token caps keep synthesis short on mlx-cpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from dora_venv import ensure_dora_venv  # noqa: E402

TEXTS = ["你好，世界。", "。。", "Hello from MLX."]


def dora_bin(version: str) -> Path:
    return Path(sys.executable).parent if version == "current" else ensure_dora_venv(version)


@pytest.mark.parametrize("version", ["current", "0.3.12"])
def test_demo_dataflow(fixtures, tmp_path, version):
    bindir = dora_bin(version)
    proc_v = subprocess.run([str(bindir / "dora"), "--version"], capture_output=True, text=True)
    version_out = proc_v.stdout + proc_v.stderr
    if version != "current":
        assert version in version_out
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    env = dict(os.environ, PRIMESPEECH_MODEL_DIR=str(fixtures.model_dir), DEMO_OUT_DIR=str(out),
               DEMO_TEXTS=str(texts), MAX_NEW_TOKENS="4", PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(bindir / "dora"), "run", str(ROOT / "dataflows" / "demo.yml")], env=env,
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
