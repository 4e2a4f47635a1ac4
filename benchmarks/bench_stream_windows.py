"""Stream-decoder window cost on the current device, per setting of the shape buckets.

    python benchmarks/bench_stream_windows.py [--bucket 32 128] [--json out/bench_stream_windows.json]

A 50-code utterance streamed with the engine's defaults (first window after 25 codes, then the
rest) three times per bucket size; prints each window's milliseconds. On MLX's CUDA backend a
window whose shapes differ from the previous call's pays a set-up cost; windows that share one
bucket do not. JSON to out/bench_stream_windows.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from harness import add_json_arg, machine_info, oracle_on_path, write_report

oracle_on_path()

from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.models.sovits_stream import SoVITSStreamDecoder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bucket", type=int, nargs="+", default=[32, 64, 128])
    add_json_arg(ap, "bench_stream_windows")
    args = ap.parse_args(argv)
    import oracle_env

    engine = Engine(oracle_env.ensure_fixtures() / "model_dir")
    voice = engine.registry.get("Doubao")
    _, sovits = engine.voice_models(voice)
    prompt = engine.prepare_voice(voice)
    rng = np.random.default_rng(0)
    phones, codes = rng.integers(1, 300, 30), rng.integers(0, 1024, 50)
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    report = {**machine_info(), "env": env, "runs": []}
    for bucket in args.bucket:
        sovits.bucket_frames = bucket
        for rep in range(4):
            dec = SoVITSStreamDecoder(sovits, phones, ge=prompt.style, speed=1.1, noise_scale=0.5, seed=0)
            windows = []
            for code in codes:
                t0 = time.perf_counter()
                out = dec.feed(int(code))
                if out.size:
                    windows.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            dec.finish()
            windows.append((time.perf_counter() - t0) * 1e3)
            report["runs"].append({"bucket": bucket, "run": rep, "windows_ms": windows})
            print(f"bucket {bucket} run {rep}: " + ", ".join(f"{w:.1f}" for w in windows) + " ms", flush=True)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
