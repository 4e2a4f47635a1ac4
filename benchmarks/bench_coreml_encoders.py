"""Encoder speed: Core ML on the Neural Engine vs the MLX encoders, same inputs, one run (Mac for Core ML).

    python benchmarks/bench_coreml_encoders.py [--model-dir DIR] [--coreml-dir DIR]
        [--seconds 10] [--tokens 32] [--repeats 20] [--json out/bench_coreml_encoders.json]

HuBERT gets a `--seconds` reference clip (+0.6 s of zeros, as GPT-SoVITS pads it); BERT gets a
Chinese sentence of `--tokens` tokens. Reports the median ms of `--repeats` warm calls (first call
and load/compile time reported separately) and the sum of both encoders against the 15 ms target.
Without --model-dir it uses the oracle-built fixture voice (random weights, real sizes). On macOS it
converts the packages first if `--coreml-dir` holds none (needs the [coreml] extra). Elsewhere only
the MLX rows are measured and the Core ML rows say why they are missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from harness import add_json_arg, machine_info, oracle_on_path, timed, write_report

oracle_on_path()

from dora_primespeech_mlx.coreml import convert_coreml, default_coreml_dir, moyoyo_dir, spec  # noqa: E402
from dora_primespeech_mlx.coreml.runtime import coreml_unavailable_reason, load_coreml_encoders  # noqa: E402


def first_median_min(fn, repeats: int) -> dict:
    """ms of the first (cold) call, then median and min of `repeats` warm calls."""
    r = timed(fn, repeats, warmup=1)
    return {"first_ms": round(1000 * r["warmup_s"][0], 2), "median_ms": round(1000 * r["median_s"], 2),
            "min_ms": round(1000 * r["min_s"], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--coreml-dir", type=Path)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    add_json_arg(ap, "bench_coreml_encoders")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.model_dir is None:
        import oracle_env

        args.model_dir = oracle_env.ensure_fixtures() / "model_dir"
    moyoyo = moyoyo_dir(args.model_dir)
    coreml_dir = args.coreml_dir or default_coreml_dir(args.model_dir)

    rng = np.random.default_rng(0)
    wav = np.concatenate([rng.standard_normal(int(args.seconds * 16000)).astype(np.float32) * 0.1,
                          np.zeros(9600, np.float32)])
    chars = args.tokens - 2
    text = ("今天天气很好我们一起去公园散步吧" * (chars // 16 + 1))[:chars]
    word2ph = [2] * chars
    report = {**machine_info(), "model_dir": str(args.model_dir),
              "inputs": {"wav_samples": int(wav.size), "hubert_frames": spec.hubert_frames(wav.size),
                         "bert_tokens": args.tokens}}

    from dora_primespeech_mlx.models.bert import load_bert
    from dora_primespeech_mlx.models.hubert import load_hubert

    hubert, bert = load_hubert(moyoyo / "chinese-hubert-base"), load_bert(moyoyo / "chinese-roberta-wwm-ext-large")
    report["mlx"] = {"hubert": first_median_min(lambda: hubert(wav), args.repeats),
                     "bert": first_median_min(lambda: bert.phone_features(text, word2ph), args.repeats)}
    hubert = bert = None  # freed before Core ML loads (the lambdas above have run)

    reason = coreml_unavailable_reason(use_ane=True)
    if reason is None:
        if not (coreml_dir / spec.MANIFEST).is_file():
            t0 = time.perf_counter()
            convert_coreml(args.model_dir, coreml_dir)
            report["coreml_convert_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        enc = load_coreml_encoders(args.model_dir, use_ane=True, coreml_dir=coreml_dir)
        report["coreml_load_s"] = round(time.perf_counter() - t0, 2)
        if enc is None:
            reason = "loading failed (see the log line above)"
        else:
            report["coreml"] = {"hubert": first_median_min(lambda: enc.hubert(wav), args.repeats),
                                "bert": first_median_min(lambda: enc.bert.phone_features(text, word2ph), args.repeats)}
    report["coreml_skipped"] = reason

    print(f"{'encoder':<10}{'backend':<10}{'first ms':>10}{'median ms':>11}{'min ms':>9}")
    for backend in ("mlx", "coreml"):
        for name, row in report.get(backend, {}).items():
            print(f"{name:<10}{backend:<10}{row['first_ms']:>10.1f}{row['median_ms']:>11.1f}{row['min_ms']:>9.1f}")
        if backend in report:
            total = sum(r["median_ms"] for r in report[backend].values())
            report[f"{backend}_both_median_ms"] = round(total, 2)
            print(f"{'both':<10}{backend:<10}{'':>10}{total:>11.1f}   (target < 15 ms on the Neural Engine)")
    if reason:
        print(f"Core ML not measured: {reason}")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
