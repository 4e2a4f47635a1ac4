"""`gpt-sovits-mlx bench`: what a user should share about speed on their machine (one JSON object).

Machine (chip, memory, OS), MLX version and device, then, on the chosen voice:
- GPT decode ms/token in one stream, eager and compiled (`mx.compile`), fp32 and fp16: steady state,
  prefill excluded, the median of `runs`, after one untimed run that traces the compiled step;
- batched decode tokens/s for 1 and 8 rows (what whole-text mode and a server use);
- first audio of a streamed text and the whole text's time and RTF (the engine as the node runs it).

Random smoke weights never stop on EOS, so token counts are capped (`max_tokens`) for comparable runs.
The same thread builds the engine and runs every measurement (the engine's threading rule).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import mlx.core as mx
import numpy as np

__all__ = ["bench_report", "decode_inputs", "decode_report", "machine_report", "time_decode"]


def _chip() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip() or platform.machine()
        except OSError:
            return platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_report() -> dict:
    """Chip, memory, OS, Python, MLX version and default device (plus the GPU's name where MLX says)."""
    info = {"chip": _chip(), "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "python": platform.python_version(), "mlx": mx.__version__, "device": str(mx.default_device())}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for backend in ("metal", "cuda"):
        module = getattr(mx, backend, None)
        if module is not None and module.is_available() and hasattr(module, "device_info"):
            try:
                details = module.device_info()
                info["gpu"] = {k: details[k] for k in ("device_name", "architecture", "memory_size") if k in details}
            except Exception:  # noqa: BLE001 - device details are a nicety
                pass
    return info


def decode_inputs(seed: int = 0):
    """bench_t2s's draw: 60 phones (a prompt transcript plus a sentence) and 150 prompt codes (~6 s of
    reference); the upstream CUDA-graph driver (tools/oracle) draws the same."""
    rng = np.random.default_rng(seed)
    n_text, n_prompt = 60, 150
    return (rng.integers(0, 732, n_text), rng.standard_normal((1024, n_text)).astype(np.float32),
            rng.integers(0, 1024, n_prompt))


def time_decode(model, inputs, tokens: int, compiled: bool) -> dict:
    """One decode of `tokens` tokens (top-k 5, seed 0): prefill ms (to the first token) and steady ms/token."""
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in model.decode_steps(*inputs, top_k=5, max_new_tokens=tokens, seed=0, compile=compiled):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": count, "prefill_ms": 1000 * (first - t0),
            "ms_per_token": 1000 * (end - first) / max(1, count - 1)}


def decode_report(gpt_path, *, tokens: int = 150, runs: int = 3, precisions=("fp32", "fp16")) -> dict:
    """Decode ms/token per precision and mode, and batched tokens/s for 1 and 8 rows (fp32)."""
    from .models.decode_kernels import fused_decode_mode
    from .models.t2s_io import load_t2s

    inputs = decode_inputs()
    out: dict = {}
    for precision in precisions:
        model = load_t2s(gpt_path, precision=precision)
        # what the compiled step runs: the fused decode kernels (CUDA, after their self-check) or MLX's ops
        mode = fused_decode_mode(model)
        out[f"decode_path_{precision}"] = {"persistent": "persistent-kernel", "kernels": "fused-kernels"}.get(mode, "mlx-ops")
        for mode, compiled in (("eager", False), ("compiled", True)):
            time_decode(model, inputs, tokens, compiled)  # untimed: traces the compiled step
            out[f"decode_ms_per_token_{precision}_{mode}"] = round(statistics.median(
                time_decode(model, inputs, tokens, compiled)["ms_per_token"] for _ in range(runs)), 3)
        if precision == "fp32":
            for rows in (1, 8):
                batch = [inputs] * rows
                model.generate_batch(batch, top_k=5, seed=list(range(rows)), max_new_tokens=tokens // 3)
                t0 = time.perf_counter()
                got = model.generate_batch(batch, top_k=5, seed=list(range(rows)), max_new_tokens=tokens // 3)
                out[f"batch_tokens_per_s_{rows}_rows"] = round(sum(len(g) for g in got) / (time.perf_counter() - t0), 1)
    return out


def bench_report(engine, voice, text: str, *, max_tokens: int | None, runs: int = 1, seed: int = 233333,
                 decode_tokens: int = 150, precisions=("fp32", "fp16")) -> dict:
    """The whole report: machine, decode figures, first audio, whole time and RTF of `text`."""
    from .options import SynthesisOptions

    report = {"machine": machine_report(), "backend": engine.backend, "voice": voice.id, "text": text}
    t0 = time.perf_counter()
    engine.voice_models(voice)
    report["load_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    engine.prepare_voice(voice)
    report["prepare_voice_s"] = round(time.perf_counter() - t0, 3)
    options = SynthesisOptions(seed=seed, max_new_tokens=max_tokens)
    t0 = time.perf_counter()
    engine.warm_up(voice, options, streaming=True)
    report["warm_up_s"] = round(time.perf_counter() - t0, 3)
    report.update(decode_report(voice.gpt_weights, tokens=decode_tokens, runs=max(1, runs), precisions=precisions))
    firsts, totals, whole, rtf = [], [], [], []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        first = None
        for _chunk in engine.synthesize_stream(text, voice, options, streaming=True):
            first = first if first is not None else time.perf_counter() - t0
        firsts.append(first)
        totals.append(time.perf_counter() - t0)
        result = engine.synthesize(text, voice, options)
        whole.append(result.timings["total_s"])
        rtf.append(result.timings.get("rtf", 0.0))
    report.update(first_audio_ms=round(1000 * statistics.median(firsts), 1),
                  streamed_total_s=round(statistics.median(totals), 3),
                  whole_total_s=round(statistics.median(whole), 3), rtf=round(statistics.median(rtf), 3))
    return report
