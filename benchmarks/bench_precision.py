"""Lower-precision modes against fp32: parity and speed, in one run on one device.

    python benchmarks/bench_precision.py [--steps 200] [--json out/bench_precision.json]

For each GPT precision (fp32, fp16, bf16, int8; `models.t2s_precision.apply_precision`), on the oracle's smoke
voice:

- token agreement over `--steps` greedy steps (repetition penalty 1, so greedy = argmax):
  * free-running: how many leading tokens equal fp32's (one flip changes everything after it);
  * teacher-forced: the fraction of positions where the mode's argmax equals fp32's token, given
    fp32's tokens as history (one forward pass over prompt + tokens), and the largest logit error
    there, relative to fp32's logit range;
- decode ms/token (steady state) and the bytes of the GPT's weights.

For the RoBERTa encoder in fp16 (`load_bert(dtype=float16)`) the phone-feature error, and for
SoVITS the waveform error of a fp32 decode of each mode's free-running tokens is not compared (the
tokens differ once they diverge); the SoVITS stage stays fp32. JSON to out/bench_precision.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np
from harness import add_json_arg, machine_info, oracle_on_path, write_report
from mlx.utils import tree_flatten

oracle_on_path()

from dora_primespeech_mlx.constants import PRECISIONS
from dora_primespeech_mlx.models.t2s_io import load_t2s
from dora_primespeech_mlx.models.t2s_precision import apply_precision


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def greedy(model, inputs, steps: int) -> tuple[list[int], float]:
    """Greedy tokens (argmax, no penalty) and the steady-state ms/token (after the first 10)."""
    times, tokens = [], []
    t_prev = time.perf_counter()
    for step in model.decode_steps(*inputs, top_k=1, repetition_penalty=1.0, max_new_tokens=steps):
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        tokens.append(step.token)
    return tokens, 1e3 * float(np.mean(times[10:])) if len(times) > 10 else float("nan")


def teacher_forced_logits(model, inputs, tokens: list[int]) -> np.ndarray:
    """Logits predicting each of `tokens` with the earlier ones as history: (len(tokens), V)."""
    phones, bert, prompt = inputs
    history = np.concatenate([prompt, np.asarray(tokens[:-1], np.int64)])
    logits = model.prefill_logits(phones, bert, history)
    return logits[-len(tokens):]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--no-bert", action="store_true", help="skip the RoBERTa fp16 measurement")
    add_json_arg(ap, "bench_precision")
    args = ap.parse_args(argv)
    import oracle_env

    fixtures = oracle_env.ensure_fixtures()
    refs = np.load(fixtures / "refs.npz")
    inputs = (refs["in_phones"][0], refs["in_bert"][0], refs["in_prompt"][0])
    gpt = next((fixtures / "model_dir" / "moyoyo" / "GPT_weights").glob("*.ckpt"))
    report: dict = {**machine_info(), "steps": args.steps, "gpt": {}}
    ref_model = load_t2s(gpt)
    ref_tokens, _ = greedy(ref_model, inputs, args.steps)
    ref_logits = teacher_forced_logits(ref_model, inputs, ref_tokens)
    span = float(ref_logits.max() - ref_logits.min())
    # sanity: the teacher-forced pass reproduces fp32's own greedy tokens
    report["fp32_teacher_forced_self_agreement"] = float(np.mean(ref_logits.argmax(-1) == np.asarray(ref_tokens)))
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    report["fp32_min_top1_top2_gap"] = float((top2[:, 1] - top2[:, 0]).min())
    del ref_model
    for precision in args.precisions:
        model = apply_precision(load_t2s(gpt), precision)
        tokens, ms = greedy(model, inputs, args.steps)
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        logits = teacher_forced_logits(model, inputs, ref_tokens)
        row = {
            "weights_mb": weight_bytes(model) / 1e6,
            "decode_ms_per_token": ms,
            "free_running_agreeing_prefix": prefix,
            "free_running_agreement": float(np.mean(np.asarray(tokens) == np.asarray(ref_tokens))),
            "teacher_forced_agreement": float(np.mean(logits.argmax(-1) == np.asarray(ref_tokens))),
            "teacher_forced_max_logit_err_rel": float(np.abs(logits - ref_logits).max()) / span,
        }
        report["gpt"][precision] = row
        print(f"{precision:>5}: weights {row['weights_mb']:7.1f} MB  decode {ms:7.2f} ms/token  "
              f"free-running prefix {prefix}/{args.steps}  teacher-forced agreement "
              f"{row['teacher_forced_agreement']:.3f}  max logit err {row['teacher_forced_max_logit_err_rel']:.2e} "
              f"of range", flush=True)
        del model
    if not args.no_bert:
        from dora_primespeech_mlx.models.bert import load_bert

        folder = fixtures / "model_dir" / "moyoyo" / "chinese-roberta-wwm-ext-large"
        text = "欢迎使用语音合成这个运行在框架上它支持中文和混合的句子"
        word2ph = [2] * len(text)
        ref = load_bert(folder).phone_features(text, word2ph)
        half = load_bert(folder, dtype=mx.float16)
        got = half.phone_features(text, word2ph)
        report["bert_fp16"] = {"weights_mb": weight_bytes(half) / 1e6,
                               "max_err_rel_to_peak": float(np.abs(got - ref).max() / np.abs(ref).max())}
        print(f"BERT fp16: weights {report['bert_fp16']['weights_mb']:.0f} MB, phone features max err "
              f"{report['bert_fp16']['max_err_rel_to_peak']:.2e} of peak")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
