"""The main job: run the demo Dora dataflow (texts in, WAV files and a timing summary out).

Voice models come from $PRIMESPEECH_MODEL_DIR when it holds `moyoyo/`, otherwise from a generated
SMOKE VOICE: random weights in the real layout, built by the PyTorch oracle. Its audio is noise, not
speech. Each stage that does not exist yet is reported as missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "oracle"))

BANNER = "=" * 72

# stage module -> the issue that delivers it
STAGES = {
    "dora_primespeech_mlx.models.t2s": "GPT (t2s) stage, issue 3",
    "dora_primespeech_mlx.models.sovits": "SoVITS stage, issue 4",
    "dora_primespeech_mlx.models.hubert": "HuBERT encoder, issue 5",
    "dora_primespeech_mlx.models.bert": "RoBERTa encoder, issue 5",
    "dora_primespeech_mlx.text": "text frontend, issues 7-8",
    "dora_primespeech_mlx.engine": "engine, issue 9",
}


def resolve_model_dir() -> tuple[Path, bool]:
    env = os.environ.get("PRIMESPEECH_MODEL_DIR")
    if env:
        path = Path(os.path.expandvars(os.path.expanduser(env)))
        if (path / "moyoyo").is_dir():
            return path, False
        print(f"PRIMESPEECH_MODEL_DIR={env} has no moyoyo/ folder; using the smoke voice instead.")
    import oracle_env

    print(BANNER)
    print("SMOKE VOICE: random weights in the real GPT-SoVITS layout. The audio is NOT speech.")
    print("Set PRIMESPEECH_MODEL_DIR to your PrimeSpeech models to hear real voices.")
    print(BANNER, flush=True)
    return oracle_env.ensure_fixtures() / "model_dir", True


def main() -> int:
    t0 = time.perf_counter()
    model_dir, smoke = resolve_model_dir()
    print(f"model directory: {model_dir}{' (smoke voice)' if smoke else ''}")
    cli = [sys.executable, "-m", "dora_primespeech_mlx.cli"]
    subprocess.run(cli + ["voices", "--model-dir", str(model_dir)], check=True)
    registry = json.loads((ROOT / "voices" / "builtin.json").read_text())
    doubao = registry["voices"][0]
    moyoyo = model_dir / "moyoyo"
    for rel in (doubao["gpt_weights"], doubao["sovits_weights"], "chinese-hubert-base"):
        t = time.perf_counter()
        out = subprocess.run(cli + ["inspect", str(moyoyo / rel)], check=True, capture_output=True, text=True)
        info = json.loads(out.stdout)
        print(f"read {rel} without torch: {info['tensors']} tensors, {info['parameters']:,} parameters "
              f"({time.perf_counter() - t:.2f} s)")
    missing = [f"{desc} ({mod})" for mod, desc in STAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(BANNER)
        print("The dataflow cannot synthesise yet. Missing:")
        for m in missing:
            print(f"  - {m}")
        print(f"Ran as far as what exists: model directory, voice registry, checkpoint reading "
              f"({time.perf_counter() - t0:.1f} s).")
        print(BANNER)
        return 0
    out_dir = ROOT / "out" / "demo"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    env = dict(os.environ, PRIMESPEECH_MODEL_DIR=str(model_dir), DEMO_OUT_DIR=str(out_dir))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(["dora", "run", str(ROOT / "dataflows" / "demo.yml")], check=True, env=env)
    summary = out_dir / "summary.json"
    if summary.exists():
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
