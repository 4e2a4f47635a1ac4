"""What a new input shape costs, stage by stage, against the same shape seen before.

    python benchmarks/bench_shapes.py [--json out/bench_shapes.json]

Every utterance has its own phone and code counts, so every stage sees shapes it has not seen
before. On MLX's CUDA backend a new shape can pay for kernel selection or JIT (convolution plans,
fused kernels) on top of the work; on Metal far less. This script times each stage on a shape it
meets for the first time ("cold") and again ("warm"), on the oracle's smoke voice, so the streaming
and bucketing choices in the engine rest on figures. JSON to out/bench_shapes.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np
from harness import add_json_arg, machine_info, oracle_on_path, write_report

oracle_on_path()

from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.models.sovits_stream import SoVITSStreamDecoder
from dora_primespeech_mlx.options import SynthesisOptions

TEXT = "欢迎使用GPT-SoVITS语音合成，这个demo运行在Apple的MLX框架上。它支持中文和English混合的句子。"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    mx.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if isinstance(out, mx.array):
        mx.eval(out)
    mx.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def cold_warm(fn, sizes: list[int]) -> list[dict]:
    """`fn(size)` on each size twice in a row: first time (cold) and again (warm), ms."""
    rows = []
    for n in sizes:
        cold, _ = timed(fn, n)
        warm, _ = timed(fn, n)
        rows.append({"size": n, "cold_ms": cold, "warm_ms": warm})
        print(f"  size {n:>5}: cold {cold:8.1f} ms  warm {warm:8.1f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_json_arg(ap, "bench_shapes")
    ap.add_argument("--tokens", type=int, default=50)
    args = ap.parse_args(argv)
    import oracle_env

    model_dir = oracle_env.ensure_fixtures() / "model_dir"
    engine = Engine(model_dir)
    voice = engine.registry.get("Doubao")
    t2s, sovits = engine.voice_models(voice)
    prompt = engine.prepare_voice(voice)
    rng = np.random.default_rng(0)
    report: dict = machine_info()
    ge = mx.array(prompt.style)[None, None]

    def decode(n: int):
        return sovits.decode(rng.integers(0, 1024, n), rng.integers(1, 300, 30), ge=prompt.style, seed=0)

    def vocode(n: int):
        return sovits.vocode(mx.array(rng.standard_normal((1, n, 192)).astype(np.float32)), ge)

    def flow(n: int):
        return sovits.flow_reverse(mx.array(rng.standard_normal((1, n, 192)).astype(np.float32)), ge)

    def enc_p(n: int):
        codes = rng.integers(0, 1024, n)
        m, _ = sovits.enc_p(sovits.codebook_frames(codes), mx.array(rng.integers(1, 300, 30).astype(np.int32))[None], ge)
        return m

    def bert(n: int):
        text = "欢迎使用语音合成这个运行在框架上它支持中文和混合的句子"[:n]
        return engine.bert().phone_features(text, [2] * len(text))

    def prefill(n: int):
        phones = rng.integers(1, 300, n)
        b = np.zeros((1024, n), np.float32)
        return t2s.prefill_logits(phones, b, prompt.prompt_codes)

    for name, fn, sizes in (("sovits_decode_codes", decode, [50, 51, 75, 50]), ("vocode_frames", vocode, [78, 100, 101]),
                            ("flow_frames", flow, [110, 111]), ("enc_p_codes", enc_p, [25, 26, 75]),
                            ("bert_chars", bert, [10, 11, 12]), ("t2s_prefill_phones", prefill, [60, 61])):
        print(name, flush=True)
        report[name] = cold_warm(fn, sizes)

    # the stream decoder's windows, code by code, at speed 1 and at the voice's speed, three times
    from dora_primespeech_mlx.models.sovits_layers import interpolate_linear

    stream_phones = rng.integers(1, 300, 30)
    stream_codes = rng.integers(0, 1024, 50)
    for speed in (1.0, 1.1):
        for rep in range(3):
            dec = SoVITSStreamDecoder(sovits, stream_phones, ge=prompt.style, speed=speed, noise_scale=0.5, seed=0)
            windows = []
            for code in stream_codes:
                ms, out = timed(dec.feed, int(code))
                if out.size:
                    windows.append(ms)
            ms, _ = timed(dec.finish)
            windows.append(ms)
            print(f"stream speed {speed} run {rep}: windows ms " + ", ".join(f"{w:.1f}" for w in windows), flush=True)
            report.setdefault("stream_windows_ms", []).append({"speed": speed, "run": rep, "windows_ms": windows})
    text_enc = sovits.enc_p.encode_text(mx.array(stream_phones.astype(np.int32))[None])
    parts = {}
    for rep in range(3):
        ms_frames, frames = timed(sovits.codebook_frames, stream_codes[:25])
        ms_hidden, y = timed(sovits.enc_p.hidden, frames, text_enc, ge)
        ms_interp, yi = timed(interpolate_linear, y, 45, scale=1.1, start=0)
        ms_proj, (m_p, logs_p) = timed(lambda: mx.eval(sovits.enc_p.project(yi)) or sovits.enc_p.project(yi))
        ms_flow, z = timed(sovits.flow_reverse, m_p, ge)
        ms_voc, audio = timed(sovits.vocode, z, ge)
        ms_np, _ = timed(np.array, audio)
        parts = {"frames": ms_frames, "enc_p_hidden": ms_hidden, "interpolate": ms_interp, "project": ms_proj,
                 "flow": ms_flow, "vocode": ms_voc, "to_numpy": ms_np}
        print("window parts ms: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    report["stream_window_parts_ms"] = parts

    # compiled GPT decode across K/V cache blocks: the slowest step with and without warm-up tracing
    from dora_primespeech_mlx.models.t2s_io import load_t2s

    phones = rng.integers(1, 300, 60)
    bert_in = np.zeros((1024, 60), np.float32)
    for warmed in (False, True):
        model = load_t2s(voice.gpt_weights, compile=True)
        warm_s = model.warm_up_compiled(1024) if warmed else 0.0
        times, t_prev = [], time.perf_counter()
        for _ in model.decode_steps(phones, bert_in, prompt.prompt_codes, max_new_tokens=600, seed=0):
            now = time.perf_counter()
            times.append((now - t_prev) * 1e3)
            t_prev = now
        slow = sorted(range(len(times)), key=lambda i: -times[i])[:4]
        report[f"t2s_decode_600_{'warmed' if warmed else 'cold'}"] = {
            "warm_up_s": warm_s, "median_ms": float(np.median(times)), "slowest": [(i, times[i]) for i in slow],
            "positions_at_start": int(phones.size + prompt.prompt_codes.size)}
        print(f"GPT 600 tokens compiled, warm-up {warm_s:.2f} s: median {np.median(times):.2f} ms, slowest steps "
              + ", ".join(f"#{i} {times[i]:.0f} ms" for i in slow), flush=True)

    options = SynthesisOptions(max_new_tokens=args.tokens, seed=0)
    t0 = time.perf_counter()
    report["engine_warm_up_s"] = engine.warm_up(voice)
    print(f"engine warm-up {report['engine_warm_up_s']:.2f} s", flush=True)
    runs = []
    for i in range(3):
        for streaming in (False, True):  # each text once before: later runs see no new shape
            t0 = time.perf_counter()
            arrivals = [time.perf_counter() - t0 for _ in engine.synthesize_stream(TEXT, voice, options,
                                                                                     streaming=streaming)]
            runs.append({"run": i, "streaming": streaming, "first_chunk_s": arrivals[0], "total_s": arrivals[-1],
                         "arrivals_s": arrivals})
            print(f"run {i} streaming={streaming}: first {arrivals[0]:.3f} s total {arrivals[-1]:.3f} s", flush=True)
    report["engine_runs"] = runs
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
