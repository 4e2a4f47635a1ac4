"""PyTorch side of benchmarks/bench_t2s.py: upstream's GPT on the same checkpoint and inputs.

Runs in the oracle venv. Prints one JSON object: prefill ms and decode ms/token per token count.
Usage: python bench_t2s_torch.py CKPT INPUTS.npz N [N ...]
"""

import json
import os
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
    device = os.environ.get("ORACLE_TORCH_DEVICE", "cpu")  # "cuda" on the GPU machine
    gpt.eval().to(device)
    dec = gpt.model
    dec.rebuild_t2s_transformer()  # its fused fast-path weights are plain attributes: rebuild on the device
    inp = np.load(inputs_path)
    phones = torch.from_numpy(inp["phones"]).long()[None].to(device)
    bert = torch.from_numpy(inp["bert"]).float()[None].to(device)
    prompt = torch.from_numpy(inp["prompt"]).long()[None].to(device)
    x_lens = torch.tensor([phones.shape[1]]).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(), "decode": {}}
    with torch.no_grad():
        # prefill alone: one decode step (early_stop_num=0 stops after the first sample)
        times = []
        for _ in range(4):  # the first run warms up (CUDA context, kernels)
            sync()
            t0 = time.perf_counter()
            next(dec.infer_panel_naive(phones, x_lens, prompt, bert, top_k=5, early_stop_num=0))
            sync()
            times.append(time.perf_counter() - t0)
        out["prefill_ms"] = 1000 * min(times)
        for n in map(int, counts):
            torch.manual_seed(0)
            sync()
            t0 = time.perf_counter()
            y, idx = next(dec.infer_panel_naive(phones, x_lens, prompt, bert, top_k=5, early_stop_num=n - 1))
            sync()
            total = time.perf_counter() - t0
            produced = int(y.shape[1] - prompt.shape[1])
            out["decode"][str(n)] = {"tokens": produced,
                                     "ms_per_token": 1000 * (total - out["prefill_ms"] / 1000) / max(1, produced - 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
