"""Extra t2s references from the upstream PyTorch GPT (run ONLY with the oracle virtualenv's python).

    python refs_t2s.py FIXTURES_DIR OUT.npz

Reads the fixture GPT (`model_dir/moyoyo/GPT_weights/doubao-mixed.ckpt`) and `refs.npz`, and writes:

- a long prompt (>= 250 positions): its inputs and prefill logits at every position (decoding
  itself is covered by the 100 greedy steps of refs.npz; a second long prefill costs ~30 s in the
  MLX test on a CPU);
- sampler cases: recorded raw logits (as is and sharpened) with previous tokens and
  (top_k, top_p, temperature, repetition_penalty) settings, passed through upstream's
  `AR.models.utils.logits_to_probs`; the penalised logits (it penalises in place) and the
  probabilities are stored, plus the smallest distance of a cumulative probability to top_p.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path for AR/*)
import AR.models.t2s_model as _t2s_model  # noqa: E402

_t2s_model._build_multiclass_accuracy_for_training = lambda *a, **k: None  # training-only metric

from AR.models.t2s_lightning_module import Text2SemanticLightningModule  # noqa: E402
from AR.models.utils import logits_to_probs  # noqa: E402

GPT_FILE = "model_dir/moyoyo/GPT_weights/doubao-mixed.ckpt"
SEED = 4321
# (top_k, top_p, temperature, repetition_penalty); top_k 0 stands for None (no top-k)
SETTINGS = [
    (5, 1.0, 1.0, 1.35),  # dora-primespeech
    (15, 1.0, 1.0, 1.35),  # upstream TTS.run now
    (0, 0.8, 1.0, 1.35),
    (20, 0.6, 0.7, 1.35),
    (50, 0.9, 1.5, 1.0),
    (3, 1.0, 0.5, 2.0),
]
STEPS = [0, 5, 10, 11, 40, 99]  # rows of t2s_step_logits_raw (< 11: EOS column dropped)
SCALES = [1.0, 6.0]  # 6x sharpens the random-weight logits so that top-p cuts after a few tokens


def load_gpt(path: Path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    gpt = Text2SemanticLightningModule(ckpt["config"], "****", is_train=False)
    gpt.load_state_dict({k: v.float() for k, v in ckpt["weight"].items()})
    gpt.eval()
    gpt.model.rebuild_t2s_transformer()
    return gpt.model


def long_prompt(dec, out: dict) -> None:
    rng = np.random.default_rng(SEED)
    n_text, n_prompt = 80, 200
    phones = torch.from_numpy(rng.integers(0, 732, size=(1, n_text))).long()
    bert = torch.from_numpy(rng.standard_normal((1, 1024, n_text)).astype(np.float32))
    bert[:, :, 50:60] = 0.0
    prompt = torch.from_numpy(rng.integers(0, 1024, size=(1, n_prompt))).long()
    with torch.no_grad():
        x = dec.ar_text_position(dec.ar_text_embedding(phones) + dec.bert_proj(bert.transpose(1, 2)))
        y = dec.ar_audio_position(dec.ar_audio_embedding(prompt))
        xy = torch.cat([x, y], 1)
        s = n_text + n_prompt
        mask = torch.zeros(s, s, dtype=torch.bool)  # True = blocked
        mask[:n_text, n_text:] = True
        mask[n_text:, n_text:] = torch.triu(torch.ones(n_prompt, n_prompt, dtype=torch.bool), 1)
        full_mask = mask[None, None].expand(1, dec.num_head, s, s)
        hidden, *_ = dec.t2s_transformer.process_prompt(xy, full_mask, 1, None, True)
        out["long_prefill_logits"] = dec.ar_predict_layer(hidden)[0].numpy()

    out.update(long_phones=phones[0].numpy(), long_bert=bert[0].numpy(), long_prompt=prompt[0].numpy())


def sampler_cases(refs: dict, out: dict) -> None:
    raw = refs["t2s_step_logits_raw"][0]
    history = np.concatenate([refs["in_prompt"][0], refs["t2s_greedy_tokens"]])
    n_prompt = refs["in_prompt"].shape[1]
    logits_in, prev, prev_len, penalised, probs, params, margins = [], [], [], [], [], [], []
    max_prev = n_prompt + max(STEPS)
    for step in STEPS:
        for scale in SCALES:
            for top_k, top_p, temp, rp in SETTINGS:
                row = torch.from_numpy(raw[step] * np.float32(scale))[None]
                if step < 11:
                    row = row[:, :-1]  # as infer_panel_naive: EOS column dropped for idx < 11
                tokens = torch.from_numpy(history[: n_prompt + step])[None]
                work = row.clone()
                p = logits_to_probs(work, tokens, temperature=temp, top_k=top_k or None, top_p=top_p,
                                    repetition_penalty=rp)
                pen = work[0].numpy()  # penalised in place by upstream
                if top_p < 1.0:
                    srt = np.sort(pen.astype(np.float64))[::-1]
                    e = np.exp(srt - srt[0])
                    margins.append(float(np.abs(np.cumsum(e / e.sum()) - top_p).min()))
                pad = np.full(1025 - pen.size, -np.inf, np.float32)
                logits_in.append(np.concatenate([row[0].numpy(), pad]))
                penalised.append(np.concatenate([pen, pad]))
                probs.append(np.concatenate([p[0].numpy(), np.zeros(1025 - pen.size, np.float32)]))
                prev.append(np.pad(tokens[0].numpy(), (0, max_prev - tokens.shape[1]), constant_values=-1))
                prev_len.append(tokens.shape[1])
                params.append((top_k, top_p, temp, rp, float(step < 11)))
    out.update(case_logits=np.stack(logits_in), case_prev=np.stack(prev).astype(np.int64),
               case_prev_len=np.asarray(prev_len, np.int64), case_penalised=np.stack(penalised),
               case_probs=np.stack(probs), case_params=np.asarray(params, np.float64),
               case_min_top_p_margin=np.float64(min(margins)))


def main() -> None:
    root, dest = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    with np.load(root / "refs.npz") as f:
        refs = {k: f[k] for k in f.files}
    out: dict = {}
    dec = load_gpt(root / GPT_FILE)
    long_prompt(dec, out)
    sampler_cases(refs, out)
    tmp = dest.with_name(dest.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(dest)


if __name__ == "__main__":
    main()
