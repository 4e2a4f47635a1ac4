"""A fixed-seed fuzz campaign over every checkpoint format the engine reads (issue 18).

2,000 cases of benchmarks/fuzz_checkpoints.py (seed 0, cases 0-1999): structure-aware mutations of
tiny valid GPT/SoVITS/HuBERT/safetensors files, each loaded by the real loader in a forked child
under memory and CPU limits. It runs in a subprocess of its own: MLX must not have computed in a
process that forks (the forked child would wait forever), and this test process may have.
Targets: no crash, no hang, no exception other than CheckpointError (or FileNotFoundError for a
removed file), no case over 5 s of CPU, no allocation over 4x the file size above the noise floor.
The long campaign is `python benchmarks/fuzz_checkpoints.py --cases 100000 --workers N`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fuzz_checkpoints.py"
N_CASES = 2000


def test_fixed_seed_fuzz_campaign(tmp_path):
    out = tmp_path / "fuzz"
    env = dict(os.environ, OMP_NUM_THREADS="1", DORA_PRIMESPEECH_MLX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--cases", str(N_CASES), "--workers", "2",
                           "--seed", "0", "--out", str(out)], check=False, capture_output=True, text=True, env=env,
                          timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    problems = json.dumps(summary["distinct_problems"], indent=1)[:6000]
    assert summary["cases"] == N_CASES, proc.stderr[-3000:]
    assert summary["crashes"] == 0 and summary["hangs"] == 0 and summary["bugs"] == 0, problems
    assert summary["over_cpu_target"] == 0, summary["max_cpu_s"]
    assert summary["over_memory_target"] == 0, summary["top_ratio_cases"]
    # the campaign reached every format and most mutations, and both outcomes occur
    assert set(summary["by_kind"]) == {"gpt", "sovits", "hubert", "hubert_st", "zoo"}
    assert len(summary["mutations"]) >= 18
    assert summary["outcomes"].get("ok", 0) > 50 and summary["outcomes"].get("refused", 0) > 1000
    assert proc.returncode == 0, proc.stdout[-3000:]
