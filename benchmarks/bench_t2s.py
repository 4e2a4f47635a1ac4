"""GPT (t2s) speed: MLX vs upstream PyTorch on the same checkpoint, inputs and machine, in one run.

    python benchmarks/bench_t2s.py [--ckpt GPT.ckpt] [--tokens 100 500] [--json out.json]

Prints a table and writes JSON: prefill ms, decode ms/token at each token count (steady state:
prefill excluded), the MLX/PyTorch ratio, and MLX's block KV cache vs a concatenating cache.
Without --ckpt it uses the oracle-built smoke GPT (random weights, full v2 size; EOS made rare so
runs reach the requested length). Sampling is top-k 5 as dora-primespeech runs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "oracle"))

from dora_primespeech_mlx.models.t2s import load_t2s  # noqa: E402


def mlx_decode(model, phones, bert, prompt, n, cache_kind):
    t0 = time.perf_counter()
    first = None
    count = 0
    for step in model.decode_steps(phones, bert, prompt, top_k=5, max_new_tokens=n, seed=0, cache_kind=cache_kind):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": count, "first_token_ms": 1000 * (first - t0),
            "ms_per_token": 1000 * (end - first) / max(1, count - 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "bench_t2s.json")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    import oracle_env

    ckpt = args.ckpt or oracle_env.ensure_fixtures() / "model_dir/moyoyo/GPT_weights/doubao-mixed.ckpt"
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 732, 60)  # ~ a prompt transcript plus one sentence
    bert = rng.standard_normal((1024, 60)).astype(np.float32)
    prompt = rng.integers(0, 1024, 150)  # a 6 s reference clip
    report = {"machine": platform.platform(), "processor": platform.processor(), "mlx": mx.__version__,
              "device": str(mx.default_device()), "ckpt": str(ckpt), "inputs": {"phones": 60, "prompt": 150}}

    t0 = time.perf_counter()
    model = load_t2s(ckpt)
    report["mlx_load_s"] = time.perf_counter() - t0
    model.prefill_logits(phones, bert, prompt)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.prefill_logits(phones, bert, prompt)
        times.append(time.perf_counter() - t0)
    report["mlx_prefill_ms"] = 1000 * min(times)
    report["mlx_decode"] = {str(n): mlx_decode(model, phones, bert, prompt, n, "step") for n in args.tokens}
    n0 = args.tokens[0]
    report["mlx_decode_concat_cache"] = {str(n0): mlx_decode(model, phones, bert, prompt, n0, "concat")}
    report["compile"] = "not applied: the decode step is not compiled yet (see issue 12)"

    if not args.no_torch:
        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / "inputs.npz"
            np.savez(inputs, phones=phones, bert=bert, prompt=prompt)
            proc = oracle_env.run_script(ROOT / "tools/oracle/bench_t2s_torch.py", str(ckpt), str(inputs),
                                         *map(str, args.tokens))
            report["torch"] = json.loads(proc.stdout.strip().splitlines()[-1])
        report["ratio_mlx_over_torch"] = {
            "prefill": report["mlx_prefill_ms"] / report["torch"]["prefill_ms"],
            **{f"decode_{n}": report["mlx_decode"][str(n)]["ms_per_token"]
               / report["torch"]["decode"][str(n)]["ms_per_token"] for n in args.tokens},
        }

    print(f"{'metric':<34}{'MLX':>12}{'PyTorch':>12}{'ratio':>10}")
    torch_r = report.get("torch", {})
    rows = [("prefill ms (210 positions)", report["mlx_prefill_ms"], torch_r.get("prefill_ms"))]
    for n in args.tokens:
        rows.append((f"decode ms/token ({n} tokens)", report["mlx_decode"][str(n)]["ms_per_token"],
                     torch_r.get("decode", {}).get(str(n), {}).get("ms_per_token")))
    rows.append((f"decode ms/token concat cache ({n0})",
                 report["mlx_decode_concat_cache"][str(n0)]["ms_per_token"], None))
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:>10.2f}" if theirs else f"{'':>10}"
        print(f"{name:<34}{ours:>12.2f}{(theirs if theirs else float('nan')):>12.2f}{ratio}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
