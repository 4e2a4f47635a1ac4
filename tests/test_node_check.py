"""The real node in a real `dora run` with the product check's driver (benchmarks/device/node_check.py),
on the CPU: a text, a long text reset while the node is busy, the first text again.

What this guards: the node's MLX owner thread serves requests sent from Dora's thread, `reset`
during synthesis gives `cancelled` (not `error`), the node keeps working after it, and the process
exits cleanly (exit 0, no "terminate called", no traceback). The same script runs on the GPU host
(benchmarks/device/gpu_node.sh), where MLX work off its thread fails outright.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_node_check_reset_gives_cancelled_and_the_node_exits_cleanly(fixtures, tmp_path):
    bindir = Path(sys.executable).parent
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device" / "node_check.py"), "--model-dir", str(fixtures.model_dir),
         "--out", str(tmp_path / "out"), "--max-new-tokens", "3", "--reset-after", "1.0",
         "--steps", "demo 0,long + reset,demo 0 again", "--dora", str(bindir / "dora"),
         "--node", str(bindir / "dora-primespeech-mlx"), "--json", str(summary), "--timeout", "1200"],
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(summary.read_text())
    assert [(s["name"], s["status"]) for s in result["steps"]] == [
        ("demo 0", "completed"), ("long + reset", "cancelled"), ("demo 0 again", "completed")]
    assert result["ready"] == "ready" and result["clean_exit"] and not result["terminate_called"]
    assert result["backend"].startswith("MLX: mlx")
    first, _, again = result["steps"]
    assert first["audio_s"] > 0 and again["audio_s"] == first["audio_s"]  # same text, same seed, same audio
