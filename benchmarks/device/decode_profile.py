"""Where a GPU decode step's time goes: host graph building vs waiting, and MLX's cost per kernel.

    python benchmarks/device/decode_profile.py MODEL_DIR [--json out.json]

1. The compiled decode step of the voice's GPT, 300 tokens: per step, the time the host spends
   calling the compiled function (building and dispatching the graph) against the whole step.
2. Chains of N dependent ops evaluated at once (eager adds on a 512-vector, and 512x512 matvecs), for
   the per-kernel cost of MLX's backend on this machine: the floor of a step of K kernels is K times it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def chain_cost(n: int, kind: str, repeats: int = 20) -> float:
    """Median µs per op of a chain of `n` dependent ops, evaluated as one graph."""
    x0 = mx.random.normal((1, 512))
    w = mx.random.normal((512, 512)) * 0.04
    mx.eval(x0, w)

    def build():
        x = x0
        for _ in range(n):
            x = x + 1.0 if kind == "add" else x @ w
        return x

    mx.eval(build())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(build())
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / n


def main(argv=None) -> int:
    from dora_primespeech_mlx.bench_report import decode_inputs

    from dora_primespeech_mlx.models.t2s_io import load_t2s
    from dora_primespeech_mlx.voices import VoiceRegistry

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = load_t2s(VoiceRegistry(args.model_dir).get("Doubao").gpt_weights, compile=True)
    inputs = decode_inputs()
    list(model.decode_steps(*inputs, top_k=5, max_new_tokens=args.tokens, seed=0))  # traces
    host = []
    original = model._static_step

    def timed_static_step(sample, compiled):
        fn = original(sample, compiled)

        def wrapper(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            host.append(time.perf_counter() - t0)
            return out

        return wrapper

    model._static_step = timed_static_step
    t0 = time.perf_counter()
    n = sum(1 for _ in model.decode_steps(*inputs, top_k=5, max_new_tokens=args.tokens, seed=0))
    step_ms = 1000 * (time.perf_counter() - t0) / n
    model._static_step = original
    report = {"device": str(mx.default_device()), "mlx": mx.__version__, "step_ms": step_ms,
              "compiled_call_ms_median": 1000 * statistics.median(host), "steps": n,
              "host_share": statistics.median(host) * 1000 / step_ms}
    for kind in ("add", "matvec"):
        for count in (100, 456, 1000):
            report[f"chain_{kind}_{count}_us_per_op"] = chain_cost(count, kind)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
