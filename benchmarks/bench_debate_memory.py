"""Memory of mofa-studio's three-node debate dataflow: three TTS nodes, three voices, one machine.

    python benchmarks/bench_debate_memory.py [--precision fp32 fp16 int8] [--json out/bench_debate_memory.json]

Each node is its own process with its own models (as under `dora up`), so the dataflow's memory is
the sum of three processes. For each precision, three processes start together, each loads an
engine, prepares its voice (HuBERT prompt codes, RoBERTa prompt features), synthesises one short
sentence (a few tokens: the weights dominate, not the activations) and reports its peak RSS and
MLX peak memory. On Apple Silicon memory is unified, so the sum of RSS is what the 8 GB budget
must hold (plus the OS and the rest of the pipeline). JSON to out/bench_debate_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import add_json_arg, machine_info, oracle_on_path, peak_rss_mb, write_report


def node(model_dir: str, voice: str, precision: str) -> None:
    """One node's worth of work; prints one JSON line."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.options import SynthesisOptions

    t0 = time.perf_counter()
    engine = Engine(model_dir, precision=precision)
    v = engine.registry.get(voice)
    engine.warm_up(v)
    result = engine.synthesize("你好，欢迎。", v, SynthesisOptions(max_new_tokens=4, seed=0))
    t2s, sovits = engine.voice_models(v)

    def mb(model) -> float:
        return sum(a.nbytes for _, a in tree_flatten(model.parameters())) / 1e6

    rss_now = None
    status = Path("/proc/self/status")
    if status.exists():  # Linux: the resident set now, after loading and one synthesis
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        rss_now = int(line.split()[1]) / 1024
    peak_mb = peak_rss_mb()
    print(json.dumps({"voice": voice, "precision": precision, "peak_rss_mb": peak_mb, "rss_mb": rss_now,
                      "mlx_peak_mb": mx.get_peak_memory() / 1e6, "seconds": time.perf_counter() - t0,
                      "audio_s": result.duration,
                      "weights_mb": {"gpt": mb(t2s), "sovits": mb(sovits), "bert": mb(engine.bert()),
                                     "hubert": mb(engine._hubert) if engine._hubert is not None else 0.0}}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16", "int8"])
    ap.add_argument("--model-dir", type=Path, help="PrimeSpeech model dir (default: the oracle's smoke voices)")
    ap.add_argument("--voices", nargs=3, default=["Doubao"] * 3,
                    help="the three nodes' voices (the smoke model dir holds Doubao's files only)")
    add_json_arg(ap, "bench_debate_memory")
    ap.add_argument("--node", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.node:
        node(*args.node)
        return 0
    oracle_on_path()
    import oracle_env

    model_dir = args.model_dir or oracle_env.ensure_fixtures() / "model_dir"
    report = {**machine_info(), "model_dir": str(model_dir), "voices": args.voices, "runs": {}}
    for precision in args.precision:
        procs = [subprocess.Popen([sys.executable, __file__, "--node", str(model_dir), voice, precision],
                                  stdout=subprocess.PIPE, text=True) for voice in args.voices]
        nodes = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"a node failed ({precision}): exit {proc.returncode}")
            nodes.append(json.loads(out.strip().splitlines()[-1]))
        total = sum(n["peak_rss_mb"] for n in nodes)
        steady = sum(n["rss_mb"] for n in nodes) if all(n["rss_mb"] for n in nodes) else None
        report["runs"][precision] = {"nodes": nodes, "total_peak_rss_mb": total, "total_rss_mb": steady}
        w = nodes[0]["weights_mb"]
        print(f"{precision}: three nodes {total:.0f} MB peak RSS in all ("
              + ", ".join(f"{n['peak_rss_mb']:.0f}" for n in nodes) + ")"
              + (f", {steady:.0f} MB resident after synthesis" if steady else "")
              + f"; weights per node: GPT {w['gpt']:.0f}, SoVITS {w['sovits']:.0f}, RoBERTa {w['bert']:.0f}, "
              f"HuBERT {w['hubert']:.0f} MB (0: unloaded after the prompt)", flush=True)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
