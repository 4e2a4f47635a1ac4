"""Where a node's first request spends more than its repeat: per-stage times on the engine, set up
as the node sets it up (load, prepare the startup voice, warm up with the node's settings).

    python benchmarks/device/first_request.py MODEL_DIR [--json out.json] [--warm-up-text TEXT]

Synthesises the demo texts, another text, then the first again, each whole (the node's default) and
prints, per text: BERT, GPT prefill (to the first token), GPT decode, SoVITS enc_p, flow, HiFi-GAN
and total seconds (each stage synchronised with mx.eval: a profile, slightly slower than the node).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[2]


def timed(store: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        mx.eval(out) if isinstance(out, mx.array) or isinstance(out, tuple) else None
        store[key] = store.get(key, 0.0) + time.perf_counter() - t0
        return out

    return wrapper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--voice", default="Doubao")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="cap (for a quick run on the CPU)")
    ap.add_argument("--thread", action="store_true", help="own the engine on a worker thread, as the node does")
    ap.add_argument("--poller", action="store_true",
                    help="plus a second thread waking every 20 ms, as the node's Dora loop does")
    args = ap.parse_args(argv)
    if not args.thread:
        return run(args)
    import threading

    stop = threading.Event()
    if args.poller:
        threading.Thread(target=lambda: [stop.wait(0.02) for _ in iter(stop.is_set, True)], daemon=True).start()
    box = {}
    worker = threading.Thread(target=lambda: box.update(rc=run(args)), name="mlx-owner")
    worker.start()
    worker.join()
    stop.set()
    return box.get("rc", 1)


def run(args) -> int:

    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.node_config import NodeConfig

    t0 = time.perf_counter()
    engine = Engine(args.model_dir)
    voice = engine.registry.get(args.voice)
    env = {"MAX_NEW_TOKENS": str(args.max_new_tokens)} if args.max_new_tokens else {}
    options = NodeConfig.from_env(env).options
    engine.prepare_voice(voice)
    load_s = time.perf_counter() - t0
    warm = engine.warm_up(voice, options)
    print(f"{engine.backend}; load+prepare {load_s:.2f} s, warm-up {warm}")
    t2s, sovits = engine.voice_models(voice)
    stage: dict = {}
    sovits_latent = sovits._latent
    flow, vocode = sovits.flow_reverse, sovits.vocode
    sovits.flow_reverse = timed(stage, "flow_s", flow)
    sovits.vocode = timed(stage, "hifigan_s", vocode)

    def latent(*a, **k):
        t = time.perf_counter()
        out = sovits_latent(*a, **k)
        mx.eval(out)
        stage["latent_s"] = stage.get("latent_s", 0.0) + time.perf_counter() - t
        return out

    sovits._latent = latent
    with_bert = engine._with_bert
    engine._with_bert = timed(stage, "bert_s", with_bert)
    decode_steps = t2s.decode_steps

    def steps(*a, **k):
        t = time.perf_counter()
        first = True
        for s in decode_steps(*a, **k):
            if first:
                stage["prefill_s"] = stage.get("prefill_s", 0.0) + time.perf_counter() - t
                t, first = time.perf_counter(), False
            yield s
        stage["decode_s"] = stage.get("decode_s", 0.0) + time.perf_counter() - t

    t2s.decode_steps = steps
    texts = [t.strip() for t in (ROOT / "dataflows/demo/texts.txt").read_text().splitlines() if t.strip()]
    texts = texts + ["重置之后，我还能继续说话。", texts[0]]
    rows = []
    for text in texts:
        stage.clear()
        t = time.perf_counter()
        result = engine.synthesize(text, voice, options)
        total = time.perf_counter() - t
        row = {"text": text, "total_s": round(total, 4), "tokens": result.timings.get("tokens"),
               "audio_s": round(result.duration, 2), **{k: round(v, 4) for k, v in stage.items()}}
        rows.append(row)
        ms = 1000 * row.get("decode_s", 0) / max(1.0, (row["tokens"] or 1) - 1)
        print(f"{total:6.3f} s  GPT decode {ms:5.2f} ms/token  {text[:24]}")
    print(f"first / repeat: {rows[0]['total_s'] / rows[-1]['total_s']:.3f} (thread {args.thread}, poller {args.poller})")
    if args.json:
        args.json.write_text(json.dumps({"backend": engine.backend, "warm_up": warm, "thread": args.thread,
                                         "poller": args.poller, "rows": rows}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
