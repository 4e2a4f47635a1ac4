"""The main job: run the demo Dora dataflow (texts in, WAV files and a timing summary out).

Voice models come from $PRIMESPEECH_MODEL_DIR when it holds `moyoyo/`, otherwise from a generated
SMOKE VOICE: random weights in the real layout, written without torch by `dora_primespeech_mlx.smoke`
and cached under $DORA_PRIMESPEECH_MLX_CACHE (default ~/.cache/dora-primespeech-mlx) as
`smoke-v<format>-seed<seed>`. Its audio is noise, not speech. Each stage that does not exist yet is
reported as missing.
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
    from dora_primespeech_mlx.smoke import ensure_smoke_model_dir, smoke_cache_dir

    print(BANNER)
    print("SMOKE VOICE: random weights in the real GPT-SoVITS layout. The audio is NOT speech.")
    print("Set PRIMESPEECH_MODEL_DIR to your PrimeSpeech models to hear real voices.")
    print(BANNER, flush=True)
    if not smoke_cache_dir().is_dir():
        print(f"writing the smoke voice (about 1.1 GB, no torch) to {smoke_cache_dir()} ...", flush=True)
    t = time.perf_counter()
    model_dir = ensure_smoke_model_dir()
    print(f"smoke voice ready in {time.perf_counter() - t:.1f} s", flush=True)
    return model_dir, True


def main() -> int:
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
        print("The engine is not complete yet; the node will answer each text with an error. Missing:")
        for m in missing:
            print(f"  - {m}")
        print(BANNER, flush=True)
    out_dir = Path(os.environ.get("DEMO_OUT_DIR") or ROOT / "out" / "demo")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    env = dict(os.environ, PRIMESPEECH_MODEL_DIR=str(model_dir), DEMO_OUT_DIR=str(out_dir))
    if smoke:
        # random weights almost never emit EOS: cap tokens so each text stays a few seconds
        env.setdefault("MAX_NEW_TOKENS", "50")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # dora-rs 1.1's daemon stopped this dataflow while the node was still loading on a busy CPU
    # (its "finish straggler" watchdog; docs/user-guide.md, Troubleshooting): turn that watchdog off
    env.setdefault("DORA_FINISH_DRAIN_GRACE_SECS", "off")
    t_run = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "dora"), "run", str(ROOT / "dataflows" / "demo.yml")],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t_run
    (out_dir / "dora_run.log").write_text(proc.stdout + proc.stderr)
    summary = summarise(out_dir, wall, model_dir, smoke, missing)
    (out_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    print_summary(summary)
    if proc.returncode != 0:
        print(f"dora run exited with {proc.returncode}; see {out_dir / 'dora_run.log'}")
        return proc.returncode
    return 0


def summarise(out_dir: Path, wall: float, model_dir: Path, smoke: bool, missing: list[str]) -> dict:
    sent = json.loads((out_dir / "sent.json").read_text()) if (out_dir / "sent.json").exists() else []
    events = json.loads((out_dir / "events.json").read_text()) if (out_dir / "events.json").exists() else []
    texts = []
    for item in sent:
        qid = item["question_id"]
        audio = [e for e in events if e["input"] == "audio" and e["metadata"].get("question_id") == qid]
        errors = [e["metadata"].get("error") for e in events
                  if e["input"] == "segment_complete" and e["metadata"].get("question_id") == qid
                  and e["value"] == ["error"]]
        first = min((e["at"] for e in audio), default=None)
        texts.append({
            "question_id": qid, "text": item["text"], "status": item.get("status"),
            "wavs": [e["wav"] for e in audio], "audio_seconds": round(sum(e["samples"] for e in audio) / 32000, 3),
            "first_audio_s": round(first - item["sent_at"], 3) if first else None,
            "completed_s": round(item["completed_at"] - item["sent_at"], 3) if "completed_at" in item else None,
            "error": errors[0] if errors else None,
        })
    return {"model_dir": str(model_dir), "smoke_voice": smoke, "missing_stages": missing,
            "dora_run_seconds": round(wall, 2), "out_dir": str(out_dir), "texts": texts}


def print_summary(summary: dict) -> None:
    print(BANNER)
    print(f"demo dataflow finished in {summary['dora_run_seconds']} s; outputs in {summary['out_dir']}")
    for t in summary["texts"]:
        line = f"  [{t['question_id']}] {t['status'] or 'no answer':<10} audio {t['audio_seconds']:>6.2f} s"
        if t["first_audio_s"] is not None:
            line += f"  first audio {t['first_audio_s']:.2f} s  done {t['completed_s']:.2f} s  {', '.join(t['wavs'])}"
        elif t["error"]:
            line += f"  error: {t['error'][:90]}"
        print(line)
    if summary["smoke_voice"]:
        print("SMOKE VOICE: these WAVs are noise from random weights, not speech.")
    print(BANNER)


if __name__ == "__main__":
    sys.exit(main())
