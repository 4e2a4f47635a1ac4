"""Memory under load: many short sequential requests with mixed voices; RSS and MLX memory sampled.

    python benchmarks/bench_memory.py [--requests 200] [--tokens 10] [--json out/bench_memory.json]

Uses the oracle-built smoke voice laid out under three voice ids (each voice loads its own GPT and
SoVITS; the engine keeps three voices' models), so voice switching is exercised. Reports process
RSS and MLX active/cache/peak memory every `--every` requests, and the growth after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from harness import add_json_arg, machine_info, oracle_on_path, rss_mb, write_report

oracle_on_path()

from dora_primespeech_mlx.engine import Engine  # noqa: E402
from dora_primespeech_mlx.options import SynthesisOptions  # noqa: E402
from dora_primespeech_mlx.voices import VoiceRegistry  # noqa: E402

VOICES = ("Doubao", "Luo Xiang", "Maple")
TEXTS = ("你好。", "今天天气不错。", "Hello there.", "我们去 park 散步吧。")


def layout(fixture_moyoyo: Path, root: Path) -> None:
    """A model dir where each voice id points at its own copy of the smoke voice's files."""
    moyoyo = root / "moyoyo"
    moyoyo.mkdir(parents=True)
    for name in ("chinese-hubert-base", "chinese-roberta-wwm-ext-large"):
        os.symlink(fixture_moyoyo / name, moyoyo / name)
    registry = VoiceRegistry(root)
    for vid in VOICES:
        v = registry.get(vid)
        for dst, src in ((v.gpt_weights, "GPT_weights/doubao-mixed.ckpt"),
                         (v.sovits_weights, "SoVITS_weights/doubao-mixed.pth"),
                         (v.reference_audio, "ref_audios/doubao_ref_mix_new.wav")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(fixture_moyoyo / src, dst)  # copies: distinct files, distinct model instances


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--every", type=int, default=10)
    add_json_arg(ap, "bench_memory")
    args = ap.parse_args(argv)
    import oracle_env

    fixture = oracle_env.ensure_fixtures() / "model_dir" / "moyoyo"
    with tempfile.TemporaryDirectory() as tmp:
        layout(fixture, Path(tmp))
        engine = Engine(tmp)
        options = SynthesisOptions(max_new_tokens=args.tokens, seed=0)
        samples = []
        t0 = time.perf_counter()
        for i in range(args.warmup + args.requests):
            voice = VOICES[i % len(VOICES)]
            engine.synthesize(TEXTS[i % len(TEXTS)], voice, options)
            if i + 1 == args.warmup or (i + 1 - args.warmup) % args.every == 0 and i >= args.warmup:
                samples.append({"request": i + 1 - args.warmup, "s": time.perf_counter() - t0, "rss_mb": rss_mb(),
                                "mlx_active_mb": mx.get_active_memory() / 1e6, "mlx_cache_mb": mx.get_cache_memory() / 1e6,
                                "mlx_peak_mb": mx.get_peak_memory() / 1e6})
                print(json.dumps(samples[-1]), flush=True)
    base, last = samples[0], samples[-1]
    report = {**machine_info(), "requests": args.requests,
              "tokens_per_sentence": args.tokens, "voices": VOICES, "samples": samples,
              "rss_growth_after_warmup": (last["rss_mb"] - base["rss_mb"]) / base["rss_mb"],
              "mlx_active_growth_after_warmup": (last["mlx_active_mb"] - base["mlx_active_mb"]) / base["mlx_active_mb"]}
    print(f"after warm-up: RSS {base['rss_mb']:.0f} -> {last['rss_mb']:.0f} MB "
          f"({100 * report['rss_growth_after_warmup']:+.1f} %), MLX active {base['mlx_active_mb']:.0f} -> "
          f"{last['mlx_active_mb']:.0f} MB ({100 * report['mlx_active_growth_after_warmup']:+.1f} %), "
          f"cache {last['mlx_cache_mb']:.0f} MB, peak {last['mlx_peak_mb']:.0f} MB, {last['s']:.1f} s")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
