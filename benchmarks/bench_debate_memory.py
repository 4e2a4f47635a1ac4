"""Memory of mofa-studio's three-node debate dataflow: three TTS nodes, three voices, one machine.

    python benchmarks/bench_debate_memory.py [--precision fp32 fp16] [--preset default low]
                                             [--json out/bench_debate_memory.json]

Each node is its own process with its own models (as under `dora up`), so the dataflow's memory is
the three processes together. For each precision (and memory preset), three processes start
together, each builds an engine, prepares its voice (HuBERT prompt codes, RoBERTa prompt features),
synthesises one short sentence (a few tokens: the weights dominate, not the activations) and then
waits, resident, while the parent reads every process's `/proc/<pid>/smaps_rollup`.

The figure of record is the sum of the three processes' PSS (proportional set size: a page shared
by n processes counts 1/n in each, so shared library code and shared file pages count once in the
sum); RSS (which counts shared pages in every process) and each node's peak RSS are reported
beside it, with PSS split into anonymous and file-backed pages. On Apple Silicon memory is unified,
so the sum is what the 8 GB budget must hold (plus the OS and the rest of the pipeline). Linux only
(/proc); JSON to out/bench_debate_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import add_json_arg, machine_info, oracle_on_path, peak_rss_mb, write_report

ROLLUP_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def smaps_rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss and its anonymous / file / shmem parts of a process, MB (1e6 bytes)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ROLLUP_KEYS:
            out[key.lower() + "_mb"] = int(rest.split()[0]) * 1024 / 1e6
    return out


def node(model_dir: str, voice: str, precision: str) -> None:
    """One node's worth of work; prints one JSON line, then stays resident until stdin closes."""
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

    print(json.dumps({"voice": voice, "precision": precision, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb(),
                      "self": smaps_rollup_mb(), "mlx_active_mb": mx.get_active_memory() / 1e6,
                      "mlx_peak_mb": mx.get_peak_memory() / 1e6, "seconds": time.perf_counter() - t0,
                      "audio_s": result.duration,
                      "weights_mb": {"gpt": mb(t2s), "sovits": mb(sovits), "bert": mb(engine.bert()),
                                     "hubert": mb(engine._hubert) if engine._hubert is not None else 0.0}}),
          flush=True)
    sys.stdin.read()  # resident until the parent has read every node's memory


def run_three(model_dir: Path, voices: list[str], precision: str, env: dict[str, str]) -> dict:
    """Three node processes at once; their memory read while all three are resident."""
    procs = [subprocess.Popen([sys.executable, __file__, "--node", str(model_dir), voice, precision],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for voice in voices]
    nodes = []
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"a node failed ({precision}): exit {proc.wait()}")
            nodes.append(json.loads(line))
        for n, proc in zip(nodes, procs):  # all three alive: shared pages are divided by three
            n["resident"] = smaps_rollup_mb(proc.pid)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()
    total = {k: sum(n["resident"][k] for n in nodes) for k in nodes[0]["resident"]}
    return {"nodes": nodes, "total": total, "total_peak_rss_mb": sum(n["peak_rss_mb"] for n in nodes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--preset", nargs="+", default=["default"],
                    help="MEMORY_PRESET values to measure (default: the unset environment variable)")
    ap.add_argument("--model-dir", type=Path, help="PrimeSpeech model dir (default: the oracle's smoke voices)")
    ap.add_argument("--voices", nargs=3, default=["Doubao"] * 3,
                    help="the three nodes' voices (the smoke model dir holds Doubao's files only)")
    ap.add_argument("--label", default="", help="a note stored with the report (what this run measures)")
    add_json_arg(ap, "bench_debate_memory")
    ap.add_argument("--node", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.node:
        node(*args.node)
        return 0
    oracle_on_path()
    import oracle_env

    model_dir = args.model_dir or oracle_env.ensure_fixtures() / "model_dir"
    report = {**machine_info(), "label": args.label, "model_dir": str(model_dir), "voices": args.voices, "runs": {}}
    for preset in args.preset:
        env = {k: v for k, v in os.environ.items() if k != "MEMORY_PRESET"}
        if preset != "default":
            env["MEMORY_PRESET"] = preset
        for precision in args.precision:
            run = run_three(model_dir, args.voices, precision, env)
            name = precision if preset == "default" else f"{precision}+{preset}"
            report["runs"][name] = run
            t, w = run["total"], run["nodes"][0]["weights_mb"]
            print(f"{name}: three nodes resident: PSS {t['pss_mb']:.0f} MB (anon {t['pss_anon_mb']:.0f}, "
                  f"file {t['pss_file_mb']:.0f}), RSS {t['rss_mb']:.0f} MB; peak RSS while loading "
                  f"{run['total_peak_rss_mb']:.0f} MB; weights per node: GPT {w['gpt']:.0f}, SoVITS "
                  f"{w['sovits']:.0f}, RoBERTa {w['bert']:.0f}, HuBERT {w['hubert']:.0f} MB "
                  "(0: unloaded after the prompt)", flush=True)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
