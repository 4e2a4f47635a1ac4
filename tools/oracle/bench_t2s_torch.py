"""PyTorch side of benchmarks/bench_t2s.py: upstream's GPT on the same checkpoint and inputs.

Runs in the oracle venv. Prints one JSON object: prefill ms and decode ms/token per token count.
Usage: python bench_t2s_torch.py CKPT INPUTS.npz N [N ...]
"""

import json
import sys
import time

import numpy as np
import torch

import GPT_SoVITS  # noqa: F401

import AR.models.t2s_model as _t2s_model  # noqa: E402

_t2s_model._build_multiclass_accuracy_for_training = lambda *a, **k: None
from AR.models.t2s_lightning_module import Text2SemanticLightningModule  # noqa: E402


def main() -> None:
    ckpt_path, inputs_path, *counts = sys.argv[1:]
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    gpt = Text2SemanticLightningModule(ckpt["config"], "****", is_train=False)
    gpt.load_state_dict({k: v.float() for k, v in ckpt["weight"].items()})
    gpt.eval()
    dec = gpt.model
    inp = np.load(inputs_path)
    phones = torch.from_numpy(inp["phones"]).long()[None]
    bert = torch.from_numpy(inp["bert"]).float()[None]
    prompt = torch.from_numpy(inp["prompt"]).long()[None]
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "decode": {}}
    with torch.no_grad():
        # prefill alone: one decode step (early_stop_num=0 stops after the first sample)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            next(dec.infer_panel_naive(phones, torch.tensor([phones.shape[1]]), prompt, bert, top_k=5,
                                       early_stop_num=0))
            times.append(time.perf_counter() - t0)
        out["prefill_ms"] = 1000 * min(times)
        for n in map(int, counts):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            y, idx = next(dec.infer_panel_naive(phones, torch.tensor([phones.shape[1]]), prompt, bert, top_k=5,
                                                early_stop_num=n - 1))
            total = time.perf_counter() - t0
            produced = int(y.shape[1] - prompt.shape[1])
            out["decode"][str(n)] = {"tokens": produced,
                                     "ms_per_token": 1000 * (total - out["prefill_ms"] / 1000) / max(1, produced - 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
