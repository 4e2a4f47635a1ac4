"""Encoder speed: CNHubert and Chinese RoBERTa, MLX vs transformers (PyTorch), same inputs and machine, one run.

    python benchmarks/bench_encoders.py [--model-dir MOYOYO] [--hubert-seconds 3 6 10] [--bert-tokens 20 100]
                                        [--repeats 1] [--budget-s 240] [--torch-threads 1] [--json out.json]

HuBERT gets N seconds of 16 kHz audio plus the 9600 zeros (0.6 s) the pipeline appends, i.e. exactly
the input of the voice-prompt step. BERT gets N token ids including [CLS]/[SEP] and runs the layers
GPT-SoVITS needs (hidden state -3: embeddings + 22 of 24 layers); the PyTorch side is timed twice:
as upstream calls it (`BertForMaskedLM(..., output_hidden_states=True)`: all 24 layers and the MLM
head) and truncated to the same 22 layers. The first call of each model is reported separately;
"warm" is the best of --repeats later calls. Without --model-dir it uses the oracle-built fixture
voice (random weights, real sizes). MLX runs BERT first, then HuBERT by size, then a per-stage
HuBERT breakdown; a size whose estimated time would overrun --budget-s is skipped and listed as such
(MLX's CPU backend is slow; see the JSON's `skipped`). Wall and process CPU time are both recorded:
on a shared machine the CPU time is the steadier figure.
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
from harness import ROOT, add_json_arg, machine_info, oracle_on_path, wall_cpu_ms, write_report

oracle_on_path()

from dora_primespeech_mlx.models.bert import load_bert  # noqa: E402
from dora_primespeech_mlx.models.hubert import load_hubert  # noqa: E402

SR = 16000
PAD = 9600  # zeros appended to the reference clip before HuBERT (0.6 s), as GPT-SoVITS does


def hubert_inputs(seconds: list[float]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for s in seconds:
        wav = (0.1 * rng.standard_normal(int(round(s * SR)))).astype(np.float32)
        out[f"hubert_{s:g}"] = np.concatenate([wav, np.zeros(PAD, np.float32)])
    return out


def bert_inputs(counts: list[int], cls_sep: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for n in counts:
        # ids in the CJK-character part of chinese-roberta's vocabulary, between [CLS] and [SEP]
        body = rng.integers(670, 7990, n - 2)
        out[f"bert_{n}"] = np.array([cls_sep[0], *body, cls_sep[1]], dtype=np.int64)
    return out


def _best(runs: list[tuple[float, float]]) -> dict:
    wall, cpu = min(runs)
    return {"warm_ms": wall, "warm_cpu_ms": cpu, "all_ms": [r[0] for r in runs]}


def hubert_breakdown(model, wav: np.ndarray) -> dict[str, float]:
    """ms per stage of one HuBERT forward (mx.eval after each stage, so stages do not overlap)."""
    x = mx.array(wav)[None]
    out = {}
    t0 = time.perf_counter()
    feats = model.feature_extractor(x)
    mx.eval(feats)
    out["conv_feature_extractor_ms"] = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    h = model.feature_projection(feats)
    mx.eval(h)
    out["feature_projection_ms"] = 1000 * (time.perf_counter() - t0)
    enc = model.encoder
    t0 = time.perf_counter()
    h = enc.layer_norm(h + enc.pos_conv_embed(h))
    mx.eval(h)
    out["positional_conv_ms"] = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for layer in enc.layers:
        h = layer(h)
    mx.eval(h)
    out["transformer_layers_ms"] = 1000 * (time.perf_counter() - t0)
    return out


def run_mlx(args, inputs: dict[str, np.ndarray], report: dict) -> None:
    deadline = time.perf_counter() + args.budget_s
    skipped = report.setdefault("skipped", [])

    def fits(est_ms: float, what: str) -> bool:
        left = deadline - time.perf_counter()
        if est_ms / 1000 > left:
            skipped.append(f"{what}: estimated {est_ms / 1000:.0f} s > {max(0.0, left):.0f} s left of --budget-s")
            return False
        return True

    t0 = time.perf_counter()
    bert = load_bert(args.model_dir / "chinese-roberta-wwm-ext-large")
    n_layers = bert.phone_feature_layer
    res = {"load_s": time.perf_counter() - t0, "layers_run": n_layers, "sizes": {}}
    first_key = f"bert_{args.bert_tokens[0]}"
    wall, cpu = wall_cpu_ms(lambda: bert.hidden_states(inputs[first_key], n_layers=n_layers))
    res["first_call"] = {"tokens": args.bert_tokens[0], "ms": wall, "cpu_ms": cpu}
    ms_per_token = res["first_call"]["ms"] / args.bert_tokens[0]
    for n in args.bert_tokens:
        ids = inputs[f"bert_{n}"]
        if not fits(ms_per_token * n * args.repeats, f"MLX BERT {n} tokens"):
            continue
        best = _best([wall_cpu_ms(lambda: bert.hidden_states(ids, n_layers=n_layers)) for _ in range(args.repeats)])
        ms_per_token = best["warm_ms"] / n
        res["sizes"][str(n)] = best
    report["mlx"]["bert"] = res
    bert = None  # freed before HuBERT loads (the lambdas above have run)

    t0 = time.perf_counter()
    hubert = load_hubert(args.model_dir / "chinese-hubert-base")
    res: dict = {"load_s": time.perf_counter() - t0, "sizes": {}}
    first_key = f"hubert_{args.hubert_seconds[0]:g}"
    wall, cpu = wall_cpu_ms(lambda: hubert(inputs[first_key]))
    res["first_call"] = {"seconds": args.hubert_seconds[0], "ms": wall, "cpu_ms": cpu}
    ms_per_sample = res["first_call"]["ms"] / inputs[first_key].size
    for s in args.hubert_seconds:
        wav = inputs[f"hubert_{s:g}"]
        if not fits(ms_per_sample * wav.size * args.repeats, f"MLX HuBERT {s:g} s"):
            continue
        best = _best([wall_cpu_ms(lambda: hubert(wav)) for _ in range(args.repeats)])
        ms_per_sample = best["warm_ms"] / wav.size
        res["sizes"][f"{s:g}"] = {"samples": int(wav.size), "frames": (wav.size - 400) // 320 + 1, **best}
    if args.breakdown:
        wav = inputs[first_key]
        if fits(ms_per_sample * wav.size, "MLX HuBERT breakdown"):
            res["breakdown"] = {"seconds": args.hubert_seconds[0], **hubert_breakdown(hubert, wav)}
    report["mlx"]["hubert"] = res


def print_table(args, report: dict) -> None:
    mlx_r, torch_r = report["mlx"], report.get("torch", {})

    def num(x):
        return f"{x:>11.0f}" if x is not None else f"{'-':>11}"

    def row(name, ours, theirs, ours_cpu, theirs_cpu):
        r = f"{ours / theirs:>9.1f}x" if ours is not None and theirs else f"{'':>10}"
        print(f"{name:<38}{num(ours)}{num(theirs)}{r}{num(ours_cpu)}{num(theirs_cpu)}")

    print(f"{'ms (warm unless noted)':<38}{'MLX':>11}{'PyTorch':>11}{'MLX/PT':>10}{'MLX cpu':>11}{'PT cpu':>11}")
    h, th = mlx_r["hubert"], torch_r.get("hubert", {})
    hf, tf = h["first_call"], th.get("first_call", {})
    row(f"HuBERT first call ({hf['seconds']:g} s)", hf["ms"], tf.get("ms"), hf["cpu_ms"], tf.get("cpu_ms"))
    for s in args.hubert_seconds:
        ours, theirs = h["sizes"].get(f"{s:g}", {}), th.get("sizes", {}).get(f"{s:g}", {})
        row(f"HuBERT {s:g} s audio (+0.6 s pad)", ours.get("warm_ms"), theirs.get("warm_ms"),
            ours.get("warm_cpu_ms"), theirs.get("warm_cpu_ms"))
    b, tb = mlx_r["bert"], torch_r.get("bert", {})
    bf, tf = b["first_call"], tb.get("first_call", {})
    row(f"BERT first call ({bf['tokens']} tok, PT upstream)", bf["ms"], tf.get("ms"), bf["cpu_ms"], tf.get("cpu_ms"))
    for n in args.bert_tokens:
        ours, theirs = b["sizes"].get(str(n), {}), tb.get("sizes", {}).get(str(n), {})
        row(f"BERT {n} tok, 22 layers both", ours.get("warm_ms"), theirs.get("needed_layers_ms"),
            ours.get("warm_cpu_ms"), theirs.get("needed_layers_cpu_ms"))
        row(f"BERT {n} tok, PT as upstream (24+MLM)", ours.get("warm_ms"), theirs.get("upstream_call_ms"),
            ours.get("warm_cpu_ms"), theirs.get("upstream_call_cpu_ms"))
    if "breakdown" in h:
        bd = h["breakdown"]
        print(f"MLX HuBERT {bd['seconds']:g} s breakdown (ms): "
              + ", ".join(f"{k[:-3]} {v:.0f}" for k, v in bd.items() if k.endswith("_ms")))
    for s in report.get("skipped", []):
        print(f"skipped {s}")
    print(f"MLX {report['mlx_version']} on {report['device']}; torch {torch_r.get('torch', '-')} with "
          f"{torch_r.get('threads', '-')} thread(s); 'cpu' = process CPU time of the same call")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    help="folder with chinese-hubert-base/ and chinese-roberta-wwm-ext-large/")
    ap.add_argument("--hubert-seconds", type=float, nargs="+", default=[3, 6, 10])
    ap.add_argument("--bert-tokens", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--repeats", type=int, default=1, help="warm MLX calls per size (best is reported)")
    ap.add_argument("--torch-repeats", type=int, default=3, help="warm PyTorch calls per size (best is reported)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (default 1: MLX's CPU backend computes on one thread, and "
                         "torch's spinning OpenMP threads collapse when other processes share the cores)")
    ap.add_argument("--budget-s", type=float, default=240, help="wall-time budget for the MLX side")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the per-stage MLX HuBERT timing")
    add_json_arg(ap, "bench_encoders")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    if min(args.bert_tokens) < 3:
        ap.error("--bert-tokens counts include [CLS] and [SEP]; use at least 3")
    import oracle_env

    if args.model_dir is None:
        args.model_dir = oracle_env.ensure_fixtures() / "model_dir" / "moyoyo"
    from dora_primespeech_mlx.models.bert import load_tokenizer

    cls_sep = load_tokenizer(args.model_dir / "chinese-roberta-wwm-ext-large").encode("").ids
    inputs = {**hubert_inputs(args.hubert_seconds), **bert_inputs(args.bert_tokens, cls_sep)}
    report: dict = {**machine_info(), "mlx": {}, "mlx_version": mx.__version__,
                    "model_dir": str(args.model_dir), "repeats": args.repeats, "torch_repeats": args.torch_repeats,
                    "inputs": {k: int(v.size) for k, v in inputs.items()}}
    t0 = time.perf_counter()
    run_mlx(args, inputs, report)
    report["mlx"]["wall_s"] = time.perf_counter() - t0

    if not args.no_torch:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "inputs.npz"
            np.savez(path, **inputs)
            t0 = time.perf_counter()
            proc = oracle_env.run_script(ROOT / "tools/oracle/bench_encoders_torch.py", str(args.model_dir),
                                         str(path), str(args.torch_repeats), str(args.torch_threads))
            report["torch"] = json.loads(proc.stdout.strip().splitlines()[-1])
            report["torch"]["wall_s"] = time.perf_counter() - t0

    print_table(args, report)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
