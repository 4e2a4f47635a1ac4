"""Parity figures of every MLX stage against the oracle references, on whatever device MLX uses.

    python benchmarks/parity_report.py [--json out/parity.json]

The unit tests assert the tolerances; this prints the actual errors (max abs, and relative to the
reference's peak where the issues define it so), e.g. to compare MLX's CPU and GPU backends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from harness import add_json_arg, machine_info, oracle_on_path, write_report

oracle_on_path()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_json_arg(ap, "parity")
    args = ap.parse_args(argv)
    import oracle_env

    from dora_primespeech_mlx.models.bert import load_bert
    from dora_primespeech_mlx.models.hubert import load_hubert
    from dora_primespeech_mlx.models.sovits import load_sovits
    from dora_primespeech_mlx.models.t2s_io import load_t2s

    root = oracle_env.ensure_fixtures()
    moyoyo = root / "model_dir" / "moyoyo"
    refs = dict(np.load(root / "refs.npz"))
    out = machine_info()
    t0 = time.perf_counter()

    t2s = load_t2s(moyoyo / "GPT_weights" / "doubao-mixed.ckpt")
    phones, bert, prompt = refs["in_phones"][0], refs["in_bert"][0], refs["in_prompt"][0]
    logits = t2s.prefill_logits(phones, bert, prompt)
    out["t2s_prefill_logits_max_abs"] = float(np.abs(logits - refs["t2s_prefill_logits"][0]).max())
    steps = list(t2s.decode_steps(phones, bert, prompt, top_k=1, max_new_tokens=100, with_logits=True))
    tokens = np.array([s.token for s in steps])
    ref_tokens = refs["t2s_greedy_tokens"]
    out["t2s_greedy_tokens_equal"] = int((tokens[: len(ref_tokens)] == ref_tokens[: len(tokens)]).sum())
    out["t2s_greedy_tokens_total"] = int(len(ref_tokens))
    step_logits = np.stack([s.logits for s in steps])
    ref_steps = refs["t2s_step_logits_raw"][0]
    n = min(len(step_logits), len(ref_steps))
    out["t2s_step_logits_max_abs"] = float(np.abs(step_logits[:n, : ref_steps.shape[1]] - ref_steps[:n]).max())

    sov = load_sovits(moyoyo / "SoVITS_weights" / "doubao-mixed.pth")
    spec = sov.spectrogram(refs["in_wav32k"][0])
    ref_spec = refs["spec_eps1e6"][0]
    out["spec_rel_peak"] = float(np.abs(spec - ref_spec).max() / np.abs(ref_spec).max())
    codes, target = refs["in_codes"][0, 0], refs["in_phones_target"][0]
    for key, kwargs in (("sov_audio", dict(speed=1.0, noise_scale=0.0)),
                        ("sov_audio_speed1p1", dict(speed=1.1, noise_scale=0.0)),
                        ("sov_audio_noise0p5_seed233333",
                         dict(speed=1.0, noise_scale=0.5, noise=refs["sov_noise_seed233333"][0]))):
        audio = sov.decode(codes, target, ref_spec, **kwargs)
        ref = refs[key].reshape(-1)
        out[f"{key}_rel_peak"] = float(np.abs(audio - ref).max() / np.abs(ref).max())

    hubert = load_hubert(moyoyo / "chinese-hubert-base")
    hidden = hubert(refs["in_wav16k_padded"])
    out["hubert_max_abs"] = float(np.abs(hidden - refs["hubert_last_hidden"][0]).max())
    codes_h = sov.extract_latent(hidden)
    out["prompt_codes_equal"] = bool(np.array_equal(codes_h, refs["prompt_codes_from_hubert"].reshape(-1)))
    bert_model = load_bert(moyoyo / "chinese-roberta-wwm-ext-large")
    hs = bert_model.hidden_states(refs["bert_input_ids"][0])
    # hidden_states[-3] of the 24-layer model: the last state of the 22 layers load_bert holds
    m3 = hs[bert_model.phone_feature_layer]
    out["bert_hidden_m3_max_abs"] = float(np.abs(m3[1:-1] - refs["bert_hidden_m3"]).max())
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    write_report(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
