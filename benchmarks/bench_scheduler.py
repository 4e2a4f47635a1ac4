"""Concurrent requests on one engine: one after another (the server's FIFO, its CPU path) against the
engine scheduler (concurrent requests share decode steps: the server on a GPU), in one process on one
set of models, streamed as the server streams `pcm`/`wav`.

    python benchmarks/bench_scheduler.py --requests 8 --tokens 60               # tiny models (CPU smoke)
    python benchmarks/bench_scheduler.py --smoke --requests 8 --tokens 100      # real sizes, random weights

All N requests arrive at once. Per mode: first-audio and total latency (p50/p95, from the common
start), the wall time, semantic tokens per second over all requests, and for the scheduler the largest
number of requests that shared one decode step. Each request's audio in the two modes is compared (max
absolute difference: float rounding of the batched matmuls only). Rounds after the first are warm
(compiled step shapes traced).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import ROOT, add_json_arg, machine_info, support_on_path, write_report

sys.path.insert(0, str(ROOT))

TEXTS = ["今天的天气很好，我们一起去公园散步吧。", "请在下一个路口向左转，然后直走五百米。",
         "这个周末有一场音乐会，你想一起去吗？", "会议改到明天下午三点，请大家准时参加。",
         "Thank you for calling, how can I help you today?", "我们的新产品将在下个月正式发布。",
         "火车将在十分钟后到达终点站，请带好随身物品。", "The quick brown fox jumps over the lazy dog."]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(records: list[dict], wall: float) -> dict:
    firsts = [r["first_s"] for r in records]
    totals = [r["total_s"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    return {"first_audio_p50_s": statistics.median(firsts), "first_audio_p95_s": percentile(firsts, 95),
            "total_p50_s": statistics.median(totals), "total_p95_s": percentile(totals, 95), "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "audio_s": sum(r["audio"].size for r in records) / 32000}


def sequential(engine, voice, requests) -> tuple[list[dict], float]:
    records, t0 = [], time.perf_counter()
    for text, options in requests:
        first, parts, tokens = None, [], []
        for chunk in engine.synthesize_stream(text, voice, options, streaming=True, on_token=tokens.append):
            first = time.perf_counter() - t0 if first is None else first
            parts.append(chunk.audio)
        records.append({"first_s": first, "total_s": time.perf_counter() - t0, "tokens": len(tokens),
                        "audio": np.concatenate(parts)})
    return records, time.perf_counter() - t0


def shared(engine, voice, requests, max_rows: int) -> tuple[list[dict], float, int]:
    from dora_primespeech_mlx.engine_scheduler import ScheduledRequest, Scheduler

    scheduler = Scheduler(engine, max_rows=max_rows)
    records = [{"first_s": None, "total_s": None, "tokens": 0, "parts": []} for _ in requests]
    t0 = time.perf_counter()

    def sink_of(record):
        def sink(kind, payload):
            now = time.perf_counter() - t0
            if kind == "chunk":
                record["first_s"] = now if record["first_s"] is None else record["first_s"]
                record["parts"].append(payload.audio)
            elif kind == "done":
                record["total_s"] = now
            else:
                raise SystemExit(f"a request ended with {kind}: {payload!r}")
        return sink

    for (text, options), record in zip(requests, records):
        scheduler.submit(ScheduledRequest(text, voice, sink_of(record), options, streaming=True,
                                          on_token=lambda _t, r=record: r.__setitem__("tokens", r["tokens"] + 1)))
    scheduler.run_until_idle()
    wall = time.perf_counter() - t0
    for record in records:
        record["audio"] = np.concatenate(record.pop("parts"))
    return records, wall, scheduler.peak_shared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="a PrimeSpeech model dir (default: tiny models)")
    ap.add_argument("--smoke", action="store_true", help="build the random-weight smoke voice (real sizes)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=60, help="MAX_NEW_TOKENS per sentence")
    ap.add_argument("--rows", type=int, default=8, help="rows per decoder (the engine's batch_rows on a GPU)")
    ap.add_argument("--rounds", type=int, default=2)
    add_json_arg(ap, "bench_scheduler")
    args = ap.parse_args(argv)
    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.options import SynthesisOptions

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is not None:
            model_dir = args.model_dir
        elif args.smoke:
            from dora_primespeech_mlx.smoke import build_smoke_model_dir

            model_dir = build_smoke_model_dir(Path(tmp) / "smoke")
        else:
            support_on_path()
            from tiny_models import build_tiny_model_dir

            model_dir = build_tiny_model_dir(Path(tmp) / "tiny")
        engine = Engine(model_dir, batch_rows=args.rows)
        voice = engine.registry.get("Doubao")
        requests = [(TEXTS[i % len(TEXTS)], SynthesisOptions(seed=100 + i, max_new_tokens=args.tokens,
                                                              text_lang="auto"))
                    for i in range(args.requests)]
        t0 = time.perf_counter()
        engine.warm_up(voice, requests[0][1], streaming=True)
        report = {**machine_info(), "models": str(args.model_dir or ("smoke" if args.smoke else "tiny")),
                  "requests": args.requests, "max_new_tokens": args.tokens, "rows": args.rows,
                  "warm_up_s": time.perf_counter() - t0, "rounds": []}
        for r in range(args.rounds):
            seq, seq_wall = sequential(engine, voice, requests)
            sh, sh_wall, peak = shared(engine, voice, requests, args.rows)
            diffs = [float(np.abs(a["audio"] - b["audio"]).max()) if a["audio"].shape == b["audio"].shape
                     else float("inf") for a, b in zip(seq, sh)]
            row = {"round": r, "sequential": summary(seq, seq_wall), "shared": {**summary(sh, sh_wall),
                                                                                "peak_shared": peak},
                   "max_abs_diff": max(diffs)}
            report["rounds"].append(row)
            s, b = row["sequential"], row["shared"]
            print(f"round {r}: sequential first p50 {s['first_audio_p50_s']:.3f} s p95 {s['first_audio_p95_s']:.3f} s, "
                  f"total p50 {s['total_p50_s']:.3f} s, wall {s['wall_s']:.3f} s, {s['tokens_per_s']:.0f} tokens/s | "
                  f"shared first p50 {b['first_audio_p50_s']:.3f} s p95 {b['first_audio_p95_s']:.3f} s, total p50 "
                  f"{b['total_p50_s']:.3f} s, wall {b['wall_s']:.3f} s, {b['tokens_per_s']:.0f} tokens/s, "
                  f"{peak} requests per step | max |diff| {row['max_abs_diff']:.2e}", flush=True)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
