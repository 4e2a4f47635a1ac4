"""A long run of the node's service: 1,000 sequential requests on the real engine; RSS must not grow.

    python benchmarks/node_soak.py [--requests 1000] [--tokens 4] [--models tiny|oracle] [--json out/node_soak.json]

Each request goes through `TTSService` exactly as `dora run` delivers it (the `mlx-owner` thread,
the outbox, the stats) on random-weight voices in the real formats laid out under three voice ids
(`tiny`: the fast tier's few-layer models, ~0.3 s a request on mlx-cpu; `oracle`: the oracle's
full-size ones, ~15 s a request on the 2-core dev machine), and the
requests cycle through what a long-lived node meets: Chinese, English and mixed text, a voice switch,
`VOICE:CUSTOM` clips (more distinct clips than the engine keeps prepared, so its LRU drops some),
a payload that is an error, one with nothing to speak, a `stats` control and a text cancelled by
`reset`. Process RSS is read after every request; the target (issue 18) is growth < 5 % from
after the first 50 requests to the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_memory import layout
from harness import add_json_arg, machine_info, oracle_on_path, rss_mb, support_on_path, write_report

oracle_on_path()
support_on_path()

from dora_primespeech_mlx.engine import MAX_PROMPTS, Engine  # noqa: E402
from dora_primespeech_mlx.node_config import NodeConfig  # noqa: E402
from dora_primespeech_mlx.node_service import TTSService  # noqa: E402
from dora_primespeech_mlx.smoke import synthetic_reference, write_wav_pcm16  # noqa: E402

TARGET_GROWTH = 0.05
BASELINE_AFTER = 50


def request_plan(clips: list[Path]) -> list[tuple[str, str | None]]:
    """One cycle of (text payload, control sent right after it or None)."""
    return [
        ("今天天气不错。", None),
        ("Hello there my friend.", None),
        ("VOICE:Luo Xiang|你好，朋友。", None),
        *[(f"VOICE:CUSTOM|{clip}|参考文本。|zh|你好。", None) for clip in clips[:1]],
        ("VOICE:CUSTOM|clips/relative.wav|参考文本。|zh|你好。", None),  # an error: not an absolute path
        ("😀🎉", None),  # nothing to speak: empty
        ("我们去 park 散步吧。", "stats"),
        ("从前有一座山，山里有一座庙。" * 3, "reset"),  # cancelled
    ]


class Tally:
    """The Dora `send` of the service: counts what goes out, keeps nothing."""

    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.messages = 0

    def __call__(self, output_id: str, data: pa.Array, metadata: dict) -> None:
        self.messages += 1
        if output_id == "segment_complete":
            self.statuses[data[0].as_py()] += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4, help="MAX_NEW_TOKENS (random weights rarely stop)")
    ap.add_argument("--clips", type=int, default=MAX_PROMPTS + 8, help="distinct VOICE:CUSTOM clips")
    ap.add_argument("--models", choices=["tiny", "oracle"], default="tiny")
    add_json_arg(ap, "node_soak")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        if args.models == "tiny":
            from tiny_models import build_tiny_model_dir

            fixture = build_tiny_model_dir(Path(tmp) / "tiny") / "moyoyo"
        else:
            import oracle_env

            fixture = oracle_env.ensure_fixtures() / "model_dir" / "moyoyo"
        layout(fixture, root)
        rng = np.random.default_rng(0)
        clips = []
        for k in range(args.clips):
            clips.append(root / "clips" / f"clip{k:02d}.wav")
            clips[-1].parent.mkdir(exist_ok=True)
            write_wav_pcm16(clips[-1], synthetic_reference(3.5 + 0.1 * (k % 10), 32000, rng), 32000)
        config = NodeConfig.from_env({"PRIMESPEECH_MODEL_DIR": str(root), "MAX_NEW_TOKENS": str(args.tokens),
                                      "LOG_LEVEL": "WARNING"})
        service = TTSService(config, lambda cfg: Engine(cfg.model_dir, precision=cfg.precision))
        if not service.wait_ready(1800) or service.engine is None:
            print(f"engine failed to start: {service.init_error}", file=sys.stderr)
            return 1
        tally = Tally()
        service.drain(tally)
        cycle = request_plan(clips)
        rss, seconds = [], []
        t_start = time.perf_counter()
        for i in range(args.requests):
            text, control = cycle[i % len(cycle)]
            if text.startswith("VOICE:CUSTOM|"):  # a different clip each time round
                text = text.replace(str(clips[0]), str(clips[(i // len(cycle)) % len(clips)]))
            t0 = time.perf_counter()
            service.handle_text(pa.array([text]), {"question_id": i})
            if control is not None:
                service.handle_control(pa.array([control]))
            if not service.wait_idle(600):
                print(f"request {i} ({text[:40]!r}) did not finish in 600 s", file=sys.stderr)
                return 1
            service.drain(tally)
            seconds.append(time.perf_counter() - t0)
            rss.append(rss_mb())
            if (i + 1) % 50 == 0:
                print(json.dumps({"requests": i + 1, "rss_mb": round(rss[-1], 1), "s": round(time.perf_counter()
                                  - t_start, 1), "statuses": dict(tally.statuses)}), flush=True)
        service.close()
    base = rss[min(BASELINE_AFTER, len(rss)) - 1]
    growth = (rss[-1] - base) / base
    report = {
        **machine_info(), "requests": args.requests, "models": args.models, "tokens": args.tokens, "custom_clips": args.clips, "max_prompts": MAX_PROMPTS,
        "statuses": dict(tally.statuses), "messages": tally.messages,
        "completions": sum(tally.statuses.values()),
        "rss_after_first_mb": rss[0], f"rss_after_{BASELINE_AFTER}_mb": base, "rss_end_mb": rss[-1],
        "rss_max_mb": max(rss), "rss_growth": growth, "target_growth": TARGET_GROWTH,
        "median_request_s": float(np.median(seconds)), "wall_s": time.perf_counter() - t_start,
        "rss_every_50": [round(r, 1) for r in rss[49::50]],
    }
    print(f"{args.requests} requests, {report['completions']} completions {dict(tally.statuses)}; RSS after "
          f"{BASELINE_AFTER}: {base:.0f} MB, end {rss[-1]:.0f} MB ({100 * growth:+.2f} %, target < "
          f"{100 * TARGET_GROWTH:.0f} %), max {max(rss):.0f} MB; {report['wall_s']:.0f} s")
    write_report(report, args.json)
    ok = report["completions"] == args.requests and growth < TARGET_GROWTH
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
