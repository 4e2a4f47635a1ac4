"""How far a streamed (windowed, cross-faded) SoVITS decode is from the whole-sequence decode.

    python tools/measure_sovits_chunks.py [--codes 60] [--json out/sovits_chunks.json]

Runs on the oracle fixture's SoVITS (random weights, full v2 size) and prints:

1. the edge sensitivity of each part, i.e. how much a frame changes when the sequence is cut
   `d` frames after it (or before it), relative to the peak:
   enc_p over a prefix of the codes (the future is missing), the reverse flow, HiFi-GAN;
2. streamed vs whole decode for several (overlap, crossfade) settings: max |diff|, max |diff| / peak,
   RMS(diff) / RMS, the number of windows and the vocoded frames (cost); plus one run whose enc_p
   latent is the whole sequence's ("settled"), which isolates the windowing and cross-fade error.

Used to choose `DEFAULT_OVERLAP` / `DEFAULT_CROSSFADE` in models/sovits_stream.py. mlx-cpu decodes
~12 s per second of audio, so the default run takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "oracle"))

from dora_primespeech_mlx.models.sovits import frame_noise, load_sovits
from dora_primespeech_mlx.models.sovits_stream import SoVITSStreamDecoder

DISTANCES = (0, 2, 4, 6, 8, 10, 12, 16, 24, 32)


def edge_curves(model, codes, phones, ge) -> dict:
    g = mx.array(ge)[None, None]
    out: dict[str, dict[str, float]] = {}
    # enc_p: latent of a prefix vs the whole sequence, by distance to the prefix end
    full = model.latent(codes, phones, ge=ge, noise_scale=0.0)["m_p"]
    peak = np.abs(full).max()
    for n in (codes.size // 4, codes.size // 2, 3 * codes.size // 4):
        part = model.latent(codes[:n], phones, ge=ge, noise_scale=0.0)["m_p"]
        err = np.abs(part - full[:, : 2 * n]).max(axis=0) / peak
        dist = 2 * n - 1 - np.arange(2 * n)
        out[f"enc_p, prefix of {n}/{codes.size} codes, all frames >= d"] = {
            str(d): float(err[dist >= d].max()) if (dist >= d).any() else float("nan") for d in DISTANCES}
    # flow: cut the input at 50 frames, by distance to the cut (right edge and left edge)
    m_p, logs_p, _ = model._latent(codes, phones, g, 1.0, 0.0, None, None)
    eps = mx.array(frame_noise(np.random.default_rng(1), m_p.shape[1], m_p.shape[2]))[None]
    z_p = m_p + eps * mx.exp(logs_p) * 0.5
    z = np.array(model.flow.reverse(z_p, g)[0])
    peak, cut, t = np.abs(z).max(), 50, z.shape[0]
    right = np.abs(np.array(model.flow.reverse(z_p[:, :cut], g)[0]) - z[:cut]).max(1) / peak
    left = np.abs(np.array(model.flow.reverse(z_p[:, t - cut :], g)[0]) - z[t - cut :]).max(1) / peak
    out["flow, right edge"] = {str(d): float(right[cut - 1 - d]) for d in DISTANCES}
    out["flow, left edge"] = {str(d): float(left[d]) for d in DISTANCES}
    # HiFi-GAN: 40 frames vs the first 28 / the last 28
    zz = mx.array(z[None, :40])
    a = np.array(model.vocode(zz, g)[0, :, 0])
    peak, n = np.abs(a).max(), 28
    right = np.abs(np.array(model.vocode(zz[:, :n], g)[0, :, 0]) - a[: n * 640]).reshape(n, 640).max(1) / peak
    left = np.abs(np.array(model.vocode(zz[:, 40 - n :], g)[0, :, 0]) - a[(40 - n) * 640 :]).reshape(n, 640).max(1) / peak
    out["hifigan, right edge"] = {str(d): float(right[n - 1 - d]) if d < n else float("nan") for d in DISTANCES}
    out["hifigan, left edge"] = {str(d): float(left[d]) if d < n else float("nan") for d in DISTANCES}
    return out


def streamed(model, codes, phones, ge, *, overlap, crossfade, settled_hidden=None, **kw) -> tuple[np.ndarray, dict]:
    dec = SoVITSStreamDecoder(model, phones, ge=ge, noise_scale=0.5, seed=1, overlap_frames=overlap,
                              crossfade_frames=crossfade, **kw)
    if settled_hidden is not None:
        dec._hidden = lambda c: settled_hidden[:, : 2 * c.size]
    vocoded = 0
    original = model.vocode

    def counting(z, g):
        nonlocal vocoded
        vocoded += z.shape[1]
        return original(z, g)

    model.vocode = counting
    try:
        t0 = time.perf_counter()
        parts = [dec.feed(c) for c in codes] + [dec.finish()]
        seconds = time.perf_counter() - t0
    finally:
        del model.vocode
    return np.concatenate(parts), {"windows": dec.windows, "vocoded_frames": vocoded, "seconds": seconds,
                                   "chunks": [int(p.size) for p in parts if p.size]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codes", type=int, default=60)
    ap.add_argument("--configs", default="4:2,8:4,16:8,24:12", help="overlap:crossfade pairs, in frames")
    ap.add_argument("--first-chunk", type=int, default=25)
    ap.add_argument("--chunk", type=int, default=25)
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "sovits_chunks.json")
    args = ap.parse_args()
    import oracle_env

    fx = oracle_env.ensure_fixtures()
    with np.load(fx / "refs.npz") as f:
        refs = {k: f[k] for k in f.files}
    model = load_sovits(fx / "model_dir/moyoyo/SoVITS_weights/doubao-mixed.pth")
    ge = model.style_vector(refs["spec_eps1e6"][0])
    codes = refs["t2s_greedy_tokens"].reshape(-1)[: args.codes]
    phones = refs["in_phones_target"][0]
    report: dict = {"codes": int(codes.size), "first_chunk_codes": args.first_chunk, "chunk_codes": args.chunk,
                    "noise_scale": 0.5, "seed": 1, "device": str(mx.default_device())}

    report["edges"] = edge_curves(model, codes, phones, ge)
    print("edge sensitivity: max |change| / peak of frames d frames from a cut")
    print(f"{'part':<58}" + "".join(f"{'d=' + d:>9}" for d in next(iter(report["edges"].values()))))
    for name, row in report["edges"].items():
        print(f"{name:<58}" + "".join(f"{v:>9.1e}" for v in row.values()))

    t0 = time.perf_counter()
    whole = model.decode(codes, phones, ge=ge, noise_scale=0.5, seed=1)
    report["whole_seconds"] = time.perf_counter() - t0
    peak, rms = float(np.abs(whole).max()), float(np.sqrt(np.mean(whole.astype(np.float64) ** 2)))
    report["whole_peak"] = peak
    g = mx.array(ge)[None, None]
    settled = model.enc_p.hidden(model.codebook_frames(codes), model.enc_p.encode_text(mx.array(phones[None].astype(np.int32))), g)
    runs = []
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    cases = [(o, c, False) for o, c in configs] + [(16, 8, True)]
    for overlap, crossfade, settle in cases:
        audio, info = streamed(model, codes, phones, ge, overlap=overlap, crossfade=crossfade,
                               settled_hidden=settled if settle else None,
                               first_chunk_codes=args.first_chunk, chunk_codes=args.chunk)
        assert audio.shape == whole.shape, (audio.shape, whole.shape)
        diff = np.abs(audio.astype(np.float64) - whole)
        runs.append({"overlap": overlap, "crossfade": crossfade, "settled_latent": settle, **info,
                     "max_abs": float(diff.max()), "max_rel_peak": float(diff.max() / peak),
                     "rms_rel": float(np.sqrt(np.mean(diff**2)) / rms)})
        logger_line = runs[-1]
        print(f"ran overlap {overlap} crossfade {crossfade}{' settled' if settle else ''}: "
              f"{logger_line['max_rel_peak']:.3e} of peak", flush=True)
    report["runs"] = runs

    print(f"\nstreamed vs whole decode, {codes.size} codes ({2 * codes.size * 640 / 32000:.2f} s), "
          f"windows after {args.first_chunk} then every {args.chunk} codes, noise 0.5")
    print(f"{'overlap':>8}{'xfade':>7}{'latent':>9}{'windows':>9}{'vocoded':>9}{'max|d|':>10}{'/peak':>10}{'rms rel':>10}")
    for r in runs:
        print(f"{r['overlap']:>8}{r['crossfade']:>7}{'settled' if r['settled_latent'] else 'prefix':>9}"
              f"{r['windows']:>9}{r['vocoded_frames']:>9}{r['max_abs']:>10.2e}{r['max_rel_peak']:>10.2e}"
              f"{r['rms_rel']:>10.2e}")
    print(f"(whole decode: {2 * codes.size} frames vocoded, peak {peak:.3f}, {report['whole_seconds']:.1f} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
