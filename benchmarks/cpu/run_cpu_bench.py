"""Linux CPU (mlx[cpu]) benchmarks under several BLAS setups, repeated, with medians.

    .venv/bin/python benchmarks/cpu/run_cpu_bench.py [--configs bundled openblas openblas-t1]
        [--benches t2s e2e] [--repeats 2] [--t2s-tokens 100] [--e2e-tokens 20]
        [--out benchmarks/results/cpu-linux]

Configs:
  bundled      the reference BLAS/LAPACK bundled in the mlx[cpu] wheel (no preload)
  openblas     benchmarks/cpu/with_openblas.sh (OpenBLAS preloaded, OPENBLAS_NUM_THREADS unset = all cores)
  openblas-t1  the same with OPENBLAS_NUM_THREADS=1
  openblas-pip the same through the scipy-openblas32 wheel and the shim (with_openblas.sh --pip)

Each (bench, config) runs --repeats times, configs interleaved (run 1 of every config, then run 2, ...)
so that a burst of load from other jobs does not land on one config only. One JSON per (bench,
config): every run's full report, /proc/loadavg before and after each run, and the medians of the
headline figures. The upstream PyTorch side runs in each bench's oracle subprocess without the
preload (the shim drops LD_PRELOAD for children), so its figures are one more sample of upstream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRAP = ROOT / "benchmarks" / "cpu" / "with_openblas.sh"

CONFIGS = {
    "bundled": ([], {}),
    "openblas": ([str(WRAP), "--system"], {}),
    "openblas-t1": ([str(WRAP), "--system"], {"OPENBLAS_NUM_THREADS": "1"}),
    "openblas-pip": ([str(WRAP), "--pip"], {}),
}

BLAS = {
    "bundled": "mlx_cpu.libs reference BLAS/LAPACK 3.10.0 (the mlx[cpu] wheel's own)",
    "openblas": "system OpenBLAS (Debian libopenblas0-pthread 0.3.21), all cores",
    "openblas-t1": "system OpenBLAS (Debian libopenblas0-pthread 0.3.21), OPENBLAS_NUM_THREADS=1",
    "openblas-pip": "scipy-openblas32 wheel through benchmarks/cpu/openblas_shim.c",
}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def headline(bench: str, r: dict, tokens: int) -> dict:
    n = str(tokens)
    if bench == "t2s":
        t = r.get("torch", {})
        return {
            "mlx_prefill_ms": r["mlx_prefill_ms"],
            "mlx_decode_ms_per_token": r["mlx_decode"][n]["ms_per_token"],
            "mlx_decode_compiled_ms_per_token": r.get("mlx_decode_compiled", {}).get(n, {}).get("ms_per_token"),
            "mlx_decode_concat_ms_per_token": r.get("mlx_decode_concat_cache", {}).get(n, {}).get("ms_per_token"),
            "torch_prefill_ms": t.get("prefill_ms"),
            "torch_decode_ms_per_token": t.get("decode", {}).get(n, {}).get("ms_per_token"),
        }
    w, s = r["mlx"]["whole"], r["mlx"]["streamed"]
    t = r.get("torch", {}).get("run", {})
    out = {
        "mlx_whole_total_s": w["total_s"],
        "mlx_streamed_total_s": s["total_s"],
        "mlx_streamed_first_audio_s": s["first_chunk_s"],
        "mlx_voice_prepare_s": r["mlx"]["voice_prepare_s"],
        "torch_total_s": t.get("total_s"),
        "torch_first_sentence_s": t.get("first_sentence_s"),
        "torch_voice_prepare_s": r.get("torch", {}).get("voice_prepare", {}).get("total_s"),
        "audio_s": w["audio_s"],
    }
    for k in ("frontend_s", "bert_s", "t2s_s", "sovits_s"):
        out[f"mlx_whole_{k}"] = w[k]
        out[f"torch_{k}"] = t.get(k)
    return out


def summary(runs: list[dict], fn) -> dict:
    out = {}
    for k in runs[0]["headline"]:
        vals = [r["headline"][k] for r in runs if r["headline"].get(k) is not None]
        out[k] = fn(vals) if vals else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["bundled", "openblas", "openblas-t1"], choices=list(CONFIGS))
    ap.add_argument("--benches", nargs="+", default=["t2s", "e2e"], choices=["t2s", "e2e"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--t2s-tokens", type=int, default=100)
    ap.add_argument("--e2e-tokens", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-linux")
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out's JSON files")
    ap.add_argument("--tmp", type=Path, default=ROOT / "out/cpu-linux-runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.tmp.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    results: dict[tuple[str, str], list[dict]] = {}
    if args.append:
        for bench in args.benches:
            for cfg in args.configs:
                f = args.out / f"{bench}_{cfg}.json"
                if f.exists():
                    results[(bench, cfg)] = json.loads(f.read_text())["runs"]
    for rep in range(1, args.repeats + 1):
        for bench in args.benches:
            for cfg in args.configs:
                rep_no = len(results.get((bench, cfg), [])) + 1
                prefix, extra_env = CONFIGS[cfg]
                tokens = args.t2s_tokens if bench == "t2s" else args.e2e_tokens
                js = args.tmp / f"{bench}_{cfg}_run{rep_no}.json"
                cmd = [
                    *prefix,
                    py,
                    str(ROOT / f"benchmarks/bench_{bench}.py"),
                    "--tokens",
                    str(tokens),
                    "--json",
                    str(js),
                ]
                env = {**os.environ, **extra_env}
                if not extra_env:
                    env.pop("OPENBLAS_NUM_THREADS", None)
                print(f"== {bench} {cfg} run {rep_no}: {' '.join(cmd)}", flush=True)
                before = loadavg()
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                after = loadavg()
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                report = json.loads(js.read_text())
                run = {
                    "run": rep_no,
                    "wall_s": wall,
                    "loadavg_before": before,
                    "loadavg_after": after,
                    "headline": headline(bench, report, tokens),
                    "report": report,
                }
                print(
                    f"   {wall:.0f} s, load {before[0]:.2f} -> {after[0]:.2f}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in run["headline"].items() if v is not None),
                    flush=True,
                )
                results.setdefault((bench, cfg), []).append(run)
                # rewrite after every run, so a cut-off session keeps what it measured
                prefix_s = (
                    ""
                    if not prefix
                    else " ".join(str(Path(p).relative_to(ROOT)) if p == str(WRAP) else p for p in prefix) + " "
                )
                doc = {
                    "bench": bench,
                    "config": cfg,
                    "command": prefix_s + f".venv/bin/python benchmarks/bench_{bench}.py --tokens {tokens}",
                    "env": extra_env,
                    "blas": BLAS[cfg],
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "note": "median and min (best) over runs; loadavg: other jobs share this machine",
                    "median": summary(results[(bench, cfg)], statistics.median),
                    "min": summary(results[(bench, cfg)], min),
                    "runs": results[(bench, cfg)],
                }
                (args.out / f"{bench}_{cfg}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
