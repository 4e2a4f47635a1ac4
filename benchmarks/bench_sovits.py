"""SoVITS decode speed: MLX vs upstream PyTorch on the same checkpoint, inputs and machine, in one run.

    python benchmarks/bench_sovits.py [--sovits X.pth] [--seconds 2 12] [--json out/bench_sovits.json]

Prints a table and writes JSON: ms per second of audio for each length (one timed run each, after a
short warm-up), the MLX/PyTorch ratio, where the time goes (enc_p / flow / HiFi-GAN and HiFi-GAN's
five upsampling stages), and HiFi-GAN through `mx.compile` vs eager at the first length (the
compiled graph is built by an untimed call at that shape first; its build time is reported).
Without --sovits it uses the oracle-built smoke SoVITS (random weights, full v2 size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from harness import ROOT, add_json_arg, machine_info, oracle_on_path, write_report
from mlx import nn

oracle_on_path()

from dora_primespeech_mlx.models.hifigan import LRELU_SLOPE
from dora_primespeech_mlx.models.sovits import SoVITS, frame_noise, load_sovits

SR = 32000


def _clock(times: dict[str, float], name: str, t0: float, *arrays: mx.array) -> float:
    mx.eval(*arrays)
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + 1000 * (now - t0)
    return now


def profiled_decode(model: SoVITS, codes: np.ndarray, phones: np.ndarray, ge: mx.array, *,
                    stages: bool) -> tuple[int, dict[str, float]]:
    """`SoVITS.decode` (noise 0.5) with an `mx.eval` after each part; returns (samples, ms per part).

    With `stages`, HiFi-GAN is also split per upsampling stage (the loop of `Generator.__call__`,
    repeated here with evaluation points).
    """
    times: dict[str, float] = {}
    t_start = t = time.perf_counter()
    q = model.codebook_frames(codes)
    text = model.enc_p.encode_text(mx.array(phones.astype(np.int32))[None])
    m_p, logs_p = model.enc_p.project(model.enc_p.hidden(q, text, ge))
    t = _clock(times, "enc_p", t, m_p, logs_p)
    eps = mx.array(frame_noise(np.random.default_rng(0), m_p.shape[1], m_p.shape[2]))[None]
    z = model.flow.reverse(m_p + eps * mx.exp(logs_p) * 0.5, ge)
    t = _clock(times, "flow", t, z)
    dec = model.dec
    if not stages:
        audio = model.vocode(z, ge)
        t = _clock(times, "hifigan", t, audio)
    else:
        t_dec = t
        x = dec.conv_pre(z) + dec.cond(ge)
        t = _clock(times, "hifigan.conv_pre", t, x)
        for i, up in enumerate(dec.ups):
            x = up(nn.leaky_relu(x, LRELU_SLOPE))
            t = _clock(times, f"hifigan.ups.{i}", t, x)
            blocks = dec.resblocks[i * dec.num_kernels : (i + 1) * dec.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs * (1.0 / dec.num_kernels)
            t = _clock(times, f"hifigan.resblocks.{i}", t, x)
        audio = mx.tanh(dec.conv_post(nn.leaky_relu(x, 0.01)))
        t = _clock(times, "hifigan.conv_post", t, audio)
        times["hifigan"] = 1000 * (t - t_dec)
    times["total"] = 1000 * (t - t_start)
    return int(audio.shape[1]), times


def torch_stage_sums(stages: dict[str, float]) -> dict[str, float]:
    """Fold the oracle's per-module hook times into the MLX profile's names."""
    out: dict[str, float] = {}
    for key, ms in stages.items():
        parts = key.split(".")
        if parts[0] == "hifigan" and len(parts) == 4:  # hifigan.resblocks.i.j -> hifigan.resblocks.i
            key = ".".join(parts[:3])
        out[key] = out.get(key, 0.0) + ms
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sovits", type=Path)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0, 12.0])
    add_json_arg(ap, "bench_sovits")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    import oracle_env

    fx = oracle_env.ensure_fixtures()
    path = args.sovits or fx / "model_dir/moyoyo/SoVITS_weights/doubao-mixed.pth"
    with np.load(fx / "refs.npz") as f:
        spec = f["spec_eps1e6"]  # (1, 1025, 150): a 3 s reference clip
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {"spec": spec}
    names = []
    for sec in args.seconds:
        n = round(sec * 25)  # 25 codes per second
        name = f"{sec:g}s"
        names.append(name)
        inputs[f"{name}_codes"] = rng.integers(0, 1024, (1, 1, n))
        inputs[f"{name}_phones"] = rng.integers(0, 732, (1, max(8, int(10 * sec))))  # ~10 phones per second
    report: dict = {**machine_info(), "sovits": str(path), "noise_scale": 0.5, "mlx_runs": {}}

    t0 = time.perf_counter()
    model = load_sovits(path)
    report["mlx_load_s"] = time.perf_counter() - t0
    ge = mx.array(model.style_vector(spec[0]))[None, None]
    first = names[0]
    profiled_decode(model, inputs[f"{first}_codes"][0, 0, :5], inputs[f"{first}_phones"][0], ge, stages=False)  # warm-up
    for k, name in enumerate(names):
        samples, times = profiled_decode(model, inputs[f"{name}_codes"][0, 0], inputs[f"{name}_phones"][0], ge,
                                         stages=k == 0)
        sec = samples / SR
        report["mlx_runs"][name] = {"audio_s": sec, "total_ms": times["total"],
                                    "ms_per_audio_s": times["total"] / sec, "stages_ms": times}
        print(f"MLX {name}: {times['total'] / sec:.0f} ms per second of audio", flush=True)

    if not args.no_compile:
        # HiFi-GAN alone, eager vs mx.compile, on the first length's latent
        compiled = load_sovits(path, compile_vocoder=True)
        m_p, _ = model.enc_p(model.codebook_frames(inputs[f"{first}_codes"][0, 0]),
                                  mx.array(inputs[f"{first}_phones"].astype(np.int32)), ge)
        z = model.flow.reverse(m_p, ge)
        mx.eval(z)
        t0 = time.perf_counter()
        ref = compiled.vocode(z, ge)
        mx.eval(ref)
        build_s = time.perf_counter() - t0
        res = {}
        for label, fn in (("eager", model.vocode), ("compiled", compiled.vocode)):
            t0 = time.perf_counter()
            out = fn(z, ge)
            mx.eval(out)
            res[label] = {"ms": 1000 * (time.perf_counter() - t0), "audio": np.array(out)}
        sec = res["eager"]["audio"].size / SR
        report["compile"] = {
            "length": first, "first_call_incl_build_s": build_s,
            "eager_ms_per_audio_s": res["eager"]["ms"] / sec, "compiled_ms_per_audio_s": res["compiled"]["ms"] / sec,
            "max_abs_diff": float(np.abs(res["eager"]["audio"] - res["compiled"]["audio"]).max()),
        }
        print(f"HiFi-GAN {first}: eager {res['eager']['ms'] / sec:.0f}, compiled {res['compiled']['ms'] / sec:.0f} "
              f"ms per second of audio (build {build_s:.1f} s)", flush=True)

    if not args.no_torch:
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "inputs.npz"
            np.savez(npz, **inputs)
            proc = oracle_env.run_script(ROOT / "tools/oracle/bench_sovits_torch.py", str(path), str(npz), *names)
            report["torch"] = json.loads(proc.stdout.strip().splitlines()[-1])
        report["ratio_mlx_over_torch"] = {
            name: report["mlx_runs"][name]["ms_per_audio_s"] / report["torch"]["runs"][name]["ms_per_audio_s"]
            for name in names}

    torch_runs = report.get("torch", {}).get("runs", {})
    print(f"\n{'ms per second of audio':<34}{'MLX':>10}{'PyTorch':>10}{'ratio':>8}")
    for name in names:
        ours = report["mlx_runs"][name]["ms_per_audio_s"]
        theirs = torch_runs.get(name, {}).get("ms_per_audio_s")
        ratio = f"{ours / theirs:>8.2f}" if theirs else f"{'':>8}"
        print(f"{'decode, ' + name + ' of audio':<34}{ours:>10.0f}{theirs or float('nan'):>10.0f}{ratio}")
    if "compile" in report:
        c = report["compile"]
        print(f"{'HiFi-GAN eager, ' + first:<34}{c['eager_ms_per_audio_s']:>10.0f}")
        print(f"{'HiFi-GAN mx.compile, ' + first:<34}{c['compiled_ms_per_audio_s']:>10.0f}"
              f"{'':>18}  (max |diff| {c['max_abs_diff']:.1e})")

    print(f"\nprofile, {first} of audio (ms; share of total)")
    ours = report["mlx_runs"][first]["stages_ms"]
    theirs = torch_stage_sums(torch_runs.get(first, {}).get("stages_ms", {}))
    t_total = torch_runs.get(first, {}).get("total_ms")
    print(f"{'part':<26}{'MLX ms':>10}{'share':>8}{'PyTorch ms':>12}{'share':>8}")
    for key in [k for k in ours if k != "total"]:
        tv = theirs.get(key)
        tcol = f"{tv:>12.0f}{100 * tv / t_total:>7.1f}%" if tv is not None and t_total else f"{'':>20}"
        print(f"{key:<26}{ours[key]:>10.0f}{100 * ours[key] / ours['total']:>7.1f}%{tcol}")
    for name in names[1:]:
        st = report["mlx_runs"][name]["stages_ms"]
        tt = torch_runs.get(name, {}).get("stages_ms", {})
        print(f"\nprofile, {name}: MLX enc_p {st['enc_p']:.0f} / flow {st['flow']:.0f} / HiFi-GAN {st['hifigan']:.0f} ms"
              + (f"; PyTorch enc_p {tt['enc_p']:.0f} / flow {tt['flow']:.0f} / HiFi-GAN {tt['hifigan']:.0f} ms"
                 if tt else ""))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
