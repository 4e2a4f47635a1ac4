"""GPT decode speed, batched decode and what users wait for, medians over several processes.

    python benchmarks/bench_decode.py [--model-dir DIR] [--processes 5] [--tokens 300] [--json out.json]
        [--parts decode batch engine] [--variants ...] [--inputs upstream_inputs.npz]

Each process (a fresh interpreter: on a GPU the step is bound by the host launching kernels, so
single processes swing) loads the voice's GPT and measures, after one untimed warm-up run:

- `decode`: steady-state ms/token of one stream (`decode_steps`, prefill excluded) per variant:
  eager; compiled (the default path: on CUDA the persistent kernel); compiled on the five kernels
  per layer and on MLX's ops where a fused path is the default; compiled with the fused head_dim-32
  attention kernel alone (GPU only); at fp32 and (with --precisions) fp16;
- `batch`: tokens/s of `T2S.generate_batch` over B rows of different lengths, B in --batch-sizes;
- `engine`: what users wait for: a 10-character Chinese segment synthesised whole (streaming off, as
  every mofa dataflow runs; 63 tokens, about 2.5 s of speech at 25 Hz: random weights would run to the
  length guard), first audio of bench_e2e's fixed 60-character text streamed, and that text whole
  with its three sentences batched vs one by one, then 10-character texts the process has not seen
  (each once), with SoVITS' frame convolutions as matmuls (the GPU default) and on MLX's convolution.

Without --model-dir it builds the smoke voice (random weights at full v2 size, EOS made rare). The
inputs default to bench_t2s's draw at seed 0 (the upstream CUDA-graph driver,
tools/oracle/bench_t2s_cudagraph_torch.py, draws and saves the same: --inputs reads its npz).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dora_primespeech_mlx.bench_report import decode_inputs, time_decode  # noqa: E402

TEXT_60 = "欢迎使用GPT-SoVITS语音合成，这个demo运行在Apple的MLX框架上。它支持中文和English混合的句子。"
TEXT_10 = "今天天气很好我们走吧。"
TOKENS_10 = 63
# texts a process has not seen (what a user's next request is): SoVITS' text encoder meets a new
# length; the second set runs with its frame convolutions on MLX's convolution (the engine before
# they became matmuls on a GPU), each text once
NEW_TEXTS = ("明天早上八点开会。", "请把窗户关上，外面很冷。", "我想喝一杯热咖啡。", "这本书非常有意思，推荐你读。")
NEW_TEXTS_NATIVE_CONVS = ("周末我们去爬山吧。", "他每天晚上都会跑步半小时。", "这里的风景真美。", "火车马上就要出发了，快点上车。")


def load_inputs(path: str | None):
    import numpy as np

    if not path:
        return decode_inputs()
    with np.load(path) as f:
        return f["phone_ids"], f["bert"].astype(np.float32), f["prompt_tokens"]


def child_decode(args, model_path) -> dict:
    import mlx.core as mx

    from dora_primespeech_mlx.models.decode_kernels import ENV_SWITCH, fused_decode_mode
    from dora_primespeech_mlx.models.t2s_io import load_t2s

    out = {}
    inputs = load_inputs(args.inputs)
    gpu = mx.default_device().type == mx.gpu
    for precision in args.precisions:
        model = load_t2s(model_path, precision=precision)
        fused_ok = model.fused_attention
        # (name, compiled, fused attention only, $DPM_FUSED_DECODE): "compiled" is the default path
        # (the persistent kernel where it passed its check, else five kernels per layer, else MLX's ops)
        variants = [("eager", False, False, "0"), ("compiled", True, False, "1")]
        mode = fused_decode_mode(model)
        out[f"{precision}/decode_path"] = mode or "mlx-ops"
        if mode == "persistent":
            variants.append(("compiled/kernels", True, False, "kernels"))
        if mode is not None:
            variants.append(("compiled/mlx-ops", True, False, "0"))
        if fused_ok:
            variants.append(("compiled+fused-attention", True, True, "0"))
        for name, compiled, fused, switch in variants:
            if args.variants and name not in args.variants:
                continue
            model.fused_attention = fused
            os.environ[ENV_SWITCH] = switch
            t0 = time.perf_counter()
            time_decode(model, inputs, args.tokens, compiled)  # warm-up: traces every block
            first_call_s = time.perf_counter() - t0
            runs = [time_decode(model, inputs, args.tokens, compiled) for _ in range(args.repeats)]
            out[f"{precision}/{name}"] = {
                "ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
                "prefill_ms": statistics.median(r["prefill_ms"] for r in runs), "tokens": runs[0]["tokens"],
                "first_call_s": first_call_s}
        model.fused_attention = fused_ok
        os.environ.pop(ENV_SWITCH, None)
        if precision == "fp32" and "batch" in args.parts:
            out.update(child_batch(args, model, inputs, gpu))
    return out


def child_batch(args, model, inputs, gpu: bool) -> dict:
    import numpy as np

    phones, bert, prompt = inputs
    out = {}
    for compiled in ([True, False] if gpu else [False]):
        model.compile_decode = compiled
        for b in args.batch_sizes:
            # rows of different lengths: the prompt text plus 0..(b-1)*7 more phones
            rows = []
            for i in range(b):
                extra = 7 * i
                rows.append((np.concatenate([phones, phones[:extra]]), np.concatenate([bert, bert[:, :extra]], axis=1),
                             prompt))
            t0 = time.perf_counter()  # the first call traces (compiled) every block it reaches
            model.generate_batch(rows, top_k=5, seed=list(range(b)), max_new_tokens=args.batch_tokens)
            first_call_s = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                got = model.generate_batch(rows, top_k=5, seed=list(range(b)), max_new_tokens=args.batch_tokens)
                times.append(time.perf_counter() - t0)
            n = sum(len(g) for g in got)
            t = statistics.median(times)
            out[f"batch{'/compiled' if compiled else '/eager'}/B{b}"] = {"tokens": n, "s": t, "tokens_per_s": n / t,
                                                                  "first_call_s": first_call_s}
    return out


def child_engine(args, model_dir) -> dict:
    import mlx.core as mx

    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.options import SynthesisOptions

    engine = Engine(model_dir)
    voice = engine.registry.get(args.voice)
    out = {"backend": engine.backend}
    t0 = time.perf_counter()
    engine.warm_up(voice, SynthesisOptions(), streaming=False)
    engine.warm_up(voice, SynthesisOptions(), streaming=True)
    out["warm_up_s"] = time.perf_counter() - t0

    def whole(text, tokens, rows=8):
        engine.batch_rows = rows
        t = time.perf_counter()
        result = engine.synthesize(text, voice, SynthesisOptions(max_new_tokens=tokens, seed=0))
        return time.perf_counter() - t, result

    def first_audio(text, tokens):
        t = time.perf_counter()
        first = first_timings = None
        for chunk in engine.synthesize_stream(text, voice, SynthesisOptions(max_new_tokens=tokens, seed=0)):
            if first is None:
                first, first_timings = time.perf_counter() - t, chunk.timings
        return first, time.perf_counter() - t, first_timings

    def stage_ms(timings: dict) -> dict:  # where the time went (the engine's per-stage seconds)
        return {k[:-2] + "_ms": 1000 * v for k, v in timings.items() if k.endswith("_s") and k != "elapsed_s"}

    whole(TEXT_10, TOKENS_10)
    runs = [whole(TEXT_10, TOKENS_10) for _ in range(args.repeats)]
    out["whole_10_chars_ms"] = 1000 * statistics.median(t for t, _ in runs)
    out["whole_10_chars_stages"] = stage_ms(runs[-1][1].timings)
    first_audio(TEXT_60, args.e2e_tokens)
    firsts = [first_audio(TEXT_60, args.e2e_tokens) for _ in range(args.repeats)]
    out["first_audio_60_chars_ms"] = 1000 * statistics.median(f for f, _, _ in firsts)
    out["first_audio_60_chars_stages"] = stage_ms(firsts[-1][2])
    out["streamed_60_chars_total_ms"] = 1000 * statistics.median(t for _, t, _ in firsts)
    for rows in (8, 1):
        whole(TEXT_60, args.e2e_tokens, rows)
        runs = [whole(TEXT_60, args.e2e_tokens, rows) for _ in range(args.repeats)]
        out[f"whole_60_chars_rows{rows}_ms"] = 1000 * statistics.median(t for t, _ in runs)
        out[f"whole_60_chars_rows{rows}_sentences"] = runs[0][1].sentences
    out["whole_new_text_ms"] = 1000 * statistics.median(whole(t, TOKENS_10)[0] for t in NEW_TEXTS)
    import mlx.nn as nn

    from dora_primespeech_mlx.models import hifigan

    as_matmul = hifigan.Conv1d._as_matmul
    hifigan.Conv1d._as_matmul = lambda self, x: nn.Conv1d.__call__(self, x)
    try:
        out["whole_new_text_native_convs_ms"] = 1000 * statistics.median(
            whole(t, TOKENS_10)[0] for t in NEW_TEXTS_NATIVE_CONVS)
    finally:
        hifigan.Conv1d._as_matmul = as_matmul
    out["peak_memory_mb"] = mx.get_peak_memory() / 1e6
    return out


def child(args) -> int:
    import mlx.core as mx

    from dora_primespeech_mlx.voices import VoiceRegistry

    voice = VoiceRegistry(args.model_dir).get(args.voice)
    out = {"device": str(mx.default_device()), "mlx": mx.__version__}
    if "decode" in args.parts or "batch" in args.parts:
        out.update(child_decode(args, voice.gpt_weights))
    if "engine" in args.parts:
        out.update(child_engine(args, args.model_dir))
    print("BENCH_JSON " + json.dumps(out), flush=True)
    return 0


def summarise(runs: list[dict]) -> dict:
    """Median (and min/max) over processes of every numeric field."""
    keys: dict[str, list[float]] = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            keys.setdefault(prefix, []).append(float(obj))

    for run in runs:
        walk("", run)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in keys.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir")
    ap.add_argument("--voice", default="Doubao")
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch-tokens", type=int, default=150)
    ap.add_argument("--e2e-tokens", type=int, default=50, help="tokens per sentence of the 60-character text")
    ap.add_argument("--precisions", nargs="+", default=["fp32"])
    ap.add_argument("--variants", nargs="*", help="decode variants to run (default: all available)")
    ap.add_argument("--parts", nargs="+", default=["decode", "batch", "engine"])
    ap.add_argument("--inputs", help="npz with phone_ids, bert, prompt_tokens (the upstream driver's --save-inputs)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if not args.model_dir:
        from dora_primespeech_mlx.smoke import build_smoke_model_dir

        args.model_dir = str(build_smoke_model_dir(Path(tempfile.mkdtemp(prefix="bench-decode-")) / "models"))
    runs = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--child",)]
    for i in range(args.processes):
        cmd = [sys.executable, __file__, "--child", "--model-dir", args.model_dir] + [
            a for a in _strip(passthrough, "--model-dir", "--json", "--processes")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        runs.append(json.loads(line[len("BENCH_JSON "):]))
        print(f"process {i + 1}/{args.processes} done", file=sys.stderr, flush=True)
        report = write(args, runs)  # after every process: a run cut short keeps what it measured
    summary = report["summary"]
    for key, v in summary.items():
        print(f"{key:45s} median {v['median']:10.3f}  [{v['min']:.3f} .. {v['max']:.3f}]")
    return 0


def write(args, runs: list[dict]) -> dict:
    from harness import machine_info

    report = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "json"},
              "summary": summarise(runs), "processes": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


def _strip(argv: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
