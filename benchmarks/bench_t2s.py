"""GPT (t2s) speed: MLX vs upstream PyTorch on the same checkpoint, inputs and machine, in one run.

    python benchmarks/bench_t2s.py [--ckpt GPT.ckpt] [--tokens 100 500] [--json out.json]

Prints a table and writes JSON: prefill ms, decode ms/token at each token count (steady state:
prefill excluded), the MLX/PyTorch ratio, MLX's block KV cache vs a concatenating cache, the
`mx.compile`d decode step (static-shape cache) vs eager, and a profile of one decode step: the
24-layer stack (attention blocks vs MLP blocks), the output head, penalty + sampling, the host
sync and the eager step's Python graph building, each run in isolation between `mx.eval`s, median
of --repeats. Without --ckpt it uses the oracle-built smoke GPT (random weights, full v2 size; EOS
made rare so runs reach the requested length). Sampling is top-k 5 as dora-primespeech runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from harness import ROOT, add_json_arg, machine_info, oracle_on_path, timed, write_report

oracle_on_path()

from dora_primespeech_mlx.models.cache import KVCache  # noqa: E402
from dora_primespeech_mlx.models.t2s_generate import COMPILE_BLOCK  # noqa: E402
from dora_primespeech_mlx.models.t2s_io import load_t2s  # noqa: E402


def mlx_decode(model, phones, bert, prompt, n, cache_kind=None, compile=False):
    t0 = time.perf_counter()
    first = None
    count = 0
    for step in model.decode_steps(phones, bert, prompt, top_k=5, max_new_tokens=n, seed=0, cache_kind=cache_kind,
                                   compile=compile):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": count, "first_token_ms": 1000 * (first - t0),
            "ms_per_token": 1000 * (end - first) / max(1, count - 1)}


def median_ms(fn, repeats: int) -> float:
    """Median wall time of `mx.eval(fn())` in ms, after one untimed warm-up call."""
    return 1000 * timed(lambda: mx.eval(fn()), repeats, warmup=1, before=mx.synchronize)["median_s"]


def profile_step(model, kv_len: int, n_text: int, repeats: int) -> dict:
    """One decode step's parts, each in isolation, at `kv_len` cached positions (random K/V).

    The parts are the ones the decode loop chains: attention blocks (QKV, cache write, SDPA, out
    projection, residual + norm1) and MLP blocks (512->2048->512 ReLU, residual + norm2) of all 24
    layers, the whole stack, the head, penalty + top-k sampling, and one host round trip. Whole-step
    rows: the eager step (block cache, graph built in Python every token), the same step over the
    static cache, and the `mx.compile`d static step. Block caches gain one position per call (a few
    positions over `kv_len`); the static rows keep their inputs alive, so their cache write copies
    the buffers, which the decode loop avoids (it drops the old buffers).
    """
    cfg = model.config
    rng = np.random.default_rng(1)
    layers = model.h.layers

    def kv(capacity):
        return [mx.array(rng.standard_normal((1, cfg.head, capacity, cfg.head_dim)).astype(np.float32))
                for _ in range(cfg.n_layer)]

    keys, values = kv(kv_len), kv(kv_len)
    offset = mx.array(kv_len - 1, dtype=mx.int32)  # static rows write the new position into the last slot

    def block_cache():
        cache = [KVCache() for _ in range(cfg.n_layer)]
        for c, k, v in zip(cache, keys, values):
            c.update_and_fetch(k[:, :, :-1], v[:, :, :-1])
        return cache
    x = mx.array(rng.standard_normal((1, 1, cfg.hidden_dim)).astype(np.float32))
    hidden = x[:, -1, :]
    seen = mx.array(rng.random(cfg.vocab_size) < 0.2)
    key = mx.random.key(0)
    token = mx.array([7], dtype=mx.int32)
    mx.eval(keys, values, x, seen, key, token)

    attn_cache = block_cache()

    def attention():
        h = x
        for layer, c in zip(layers, attn_cache):
            h = layer.norm1(h + layer.self_attn(h, None, c))
        return h

    def mlp():
        h = x
        for layer in layers:
            h = layer.norm2(h + layer.linear2(nn.relu(layer.linear1(h))))
        return h

    stack_cache = block_cache()

    def stack():
        return model(x, None, stack_cache)

    sample = model._sample_fn(5, 1.0, 1.0, 1.35)
    logits = model.ar_predict_layer(hidden)
    mx.eval(logits)
    one = mx.array([1, 0], dtype=mx.int32)

    def host_sync():
        # what the loop pays once per token besides compute: evaluate a tiny graph and read it back
        (one + 1).tolist()
        return one

    ms = {
        "attention_blocks": median_ms(attention, repeats),
        "mlp_blocks": median_ms(mlp, repeats),
        "layer_stack": median_ms(stack, repeats),
        "head": median_ms(lambda: model.ar_predict_layer(hidden), repeats),
        "penalty_sampling": median_ms(lambda: sample(logits, seen, key, True)[1], repeats),
        "host_sync": median_ms(host_sync, repeats),
    }

    # the eager loop's step: graph building alone (Python, no evaluation) and the evaluated step
    advance = model._eager_advance(block_cache(), kv_len - n_text, sample)
    builds = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = advance(token, seen, key, 20 + i)
        builds.append(time.perf_counter() - t0)
        mx.eval(out)
    ms["graph_build_eager_step"] = 1000 * statistics.median(builds)
    ms["step_eager"] = median_ms(lambda: advance(token, seen, key, 40), repeats)

    # the static-cache step as decode_steps(compile=...) runs it: capacity in COMPILE_BLOCK buckets
    capacity = -(-(kv_len + 1) // COMPILE_BLOCK) * COMPILE_BLOCK
    pad = [mx.zeros((1, cfg.head, capacity - kv_len, cfg.head_dim)) for _ in range(cfg.n_layer)]
    skeys = [mx.concatenate([k, p], axis=2) for k, p in zip(keys, pad)]
    svalues = [mx.concatenate([v, p], axis=2) for v, p in zip(values, pad)]
    mx.eval(skeys, svalues)
    args = (token, mx.array(kv_len - n_text, dtype=mx.int32), offset, seen, key, mx.array(True), skeys, svalues)
    for name, compiled in (("step_static_eager", False), ("step_compiled", True)):
        fn = model._static_step(sample, compiled)
        ms[name] = median_ms(lambda fn=fn: fn(*args), repeats)
    parts = ("layer_stack", "head", "penalty_sampling", "host_sync")
    ms["sum_of_parts"] = sum(ms[p] for p in parts)
    return {"kv_len": kv_len, "n_layers": cfg.n_layer, "static_capacity": capacity, "repeats": repeats, "ms": ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 500])
    add_json_arg(ap, "bench_t2s")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--repeats", type=int, default=7, help="repeats of each profiled part (median)")
    args = ap.parse_args(argv)
    import oracle_env

    ckpt = args.ckpt or oracle_env.ensure_fixtures() / "model_dir/moyoyo/GPT_weights/doubao-mixed.ckpt"
    rng = np.random.default_rng(0)
    phones = rng.integers(0, 732, 60)  # ~ a prompt transcript plus one sentence
    bert = rng.standard_normal((1024, 60)).astype(np.float32)
    prompt = rng.integers(0, 1024, 150)  # a 6 s reference clip
    report = {**machine_info(), "ckpt": str(ckpt), "inputs": {"phones": 60, "prompt": 150}}

    t0 = time.perf_counter()
    model = load_t2s(ckpt)
    report["mlx_load_s"] = time.perf_counter() - t0
    prefill = timed(lambda: model.prefill_logits(phones, bert, prompt), 3, warmup=1)
    report["mlx_prefill_ms"] = 1000 * prefill["min_s"]
    report["mlx_decode"] = {str(n): mlx_decode(model, phones, bert, prompt, n, "step") for n in args.tokens}
    n0 = args.tokens[0]
    report["mlx_decode_concat_cache"] = {str(n0): mlx_decode(model, phones, bert, prompt, n0, "concat")}
    # compile on/off at the first token count: the static cache eagerly, then compiled, cold (traces
    # each capacity bucket it reaches) and warm (the compiled graphs reused)
    report["mlx_decode_static_cache"] = {str(n0): mlx_decode(model, phones, bert, prompt, n0, "static")}
    cold = mlx_decode(model, phones, bert, prompt, n0, compile=True)
    report["mlx_decode_compiled"] = {str(n0): mlx_decode(model, phones, bert, prompt, n0, compile=True)}
    report["mlx_decode_compiled_cold"] = {str(n0): cold}
    # mid-run KV length: prompt text + prompt codes + half of the first token count
    report["profile"] = profile_step(model, len(phones) + len(prompt) + n0 // 2, len(phones), args.repeats)

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
    rows.append((f"decode ms/token static cache ({n0})",
                 report["mlx_decode_static_cache"][str(n0)]["ms_per_token"], None))
    rows.append((f"decode ms/token mx.compile ({n0})", report["mlx_decode_compiled"][str(n0)]["ms_per_token"], None))
    rows.append((f"  compile cold: ms/token ({n0})", cold["ms_per_token"], None))
    rows.append(("  compile cold: first token ms", cold["first_token_ms"], None))
    rows.append(("  eager: first token ms", report["mlx_decode"][str(n0)]["first_token_ms"], None))
    for name, ours, theirs in rows:
        ratio = f"{ours / theirs:>10.2f}" if theirs else f"{'':>10}"
        print(f"{name:<34}{ours:>12.2f}{(theirs if theirs else float('nan')):>12.2f}{ratio}")
    prof = report["profile"]
    ms = prof["ms"]
    print(f"\nprofile of one decode step (KV length {prof['kv_len']}, median of {prof['repeats']}, each part "
          f"alone; % of the eager step)")
    for name, value in ms.items():
        print(f"  {name:<32}{value:>10.3f} ms{100 * value / ms['step_eager']:>8.1f} %")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
