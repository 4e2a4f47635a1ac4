"""PyTorch side of benchmarks/bench_encoders.py: transformers HuBERT and BERT on the same inputs.

Runs in the oracle venv. Prints one JSON object (ms; the first call separately, warm = best of
REPEATS; wall and process CPU time of each).
Usage: python bench_encoders_torch.py MOYOYO_DIR INPUTS.npz REPEATS THREADS

INPUTS.npz holds `hubert_<seconds>` float32 waveforms (already padded) and `bert_<n>` int64 token ids.
BERT is timed as GPT-SoVITS calls it (`BertForMaskedLM(**inputs, output_hidden_states=True)`: 24 layers
and the MLM head) and truncated to the layers hidden state -3 needs (22), as the MLX side runs it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertForMaskedLM, HubertModel


DEVICE = os.environ.get("ORACLE_TORCH_DEVICE", "cpu")  # "cuda" on the GPU machine


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, float]:
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def _first(fn) -> dict:
    wall, cpu = _timed(fn)
    return {"ms": wall, "cpu_ms": cpu}


def main(argv: list[str]) -> int:
    moyoyo, inputs_path, repeats, threads = Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4])
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    inp = np.load(inputs_path)
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    hubert = HubertModel.from_pretrained(str(moyoyo / "chinese-hubert-base"), local_files_only=True).float().eval().to(DEVICE)
    res: dict = {"load_s": time.perf_counter() - t0, "sizes": {}}
    keys = [k for k in inp.files if k.startswith("hubert_")]  # in the order the caller saved them
    wavs = {k[len("hubert_"):]: torch.from_numpy(inp[k])[None].to(DEVICE) for k in keys}
    first = next(iter(wavs))
    res["first_call"] = {"seconds": float(first), **_first(lambda: hubert(wavs[first]))}
    for s, wav in wavs.items():
        wall, cpu = min(_timed(lambda: hubert(wav)["last_hidden_state"]) for _ in range(repeats))
        res["sizes"][s] = {"warm_ms": wall, "warm_cpu_ms": cpu}
    out["hubert"] = res
    del hubert

    t0 = time.perf_counter()
    bert = BertForMaskedLM.from_pretrained(str(moyoyo / "chinese-roberta-wwm-ext-large"),
                                           local_files_only=True).float().eval().to(DEVICE)
    res = {"load_s": time.perf_counter() - t0, "sizes": {}}
    n_needed = bert.config.num_hidden_layers - 2  # hidden_states[-3] = output of layer L-2
    trunk = copy.deepcopy(bert.bert)
    trunk.encoder.layer = trunk.encoder.layer[:n_needed]
    res["layers_needed"] = n_needed

    def upstream(ids: torch.Tensor):
        # as GPT-SoVITS get_bert_feature: the tokenizer's three tensors, all hidden states, layer -3
        hs = bert(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                  output_hidden_states=True)["hidden_states"]
        return hs[-3][0][1:-1]

    def needed(ids: torch.Tensor):
        hs = trunk(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                   output_hidden_states=True)["hidden_states"]
        return hs[-1][0][1:-1]

    ids_by_n = {k[len("bert_"):]: torch.from_numpy(inp[k])[None].to(DEVICE) for k in inp.files if k.startswith("bert_")}
    first = next(iter(ids_by_n))
    res["first_call"] = {"tokens": int(first), **_first(lambda: upstream(ids_by_n[first]))}
    for n, ids in ids_by_n.items():
        assert torch.allclose(upstream(ids), needed(ids), atol=1e-5)  # same features either way
        t_up = min(_timed(lambda: upstream(ids)) for _ in range(repeats))
        t_need = min(_timed(lambda: needed(ids)) for _ in range(repeats))
        res["sizes"][n] = {"upstream_call_ms": t_up[0], "upstream_call_cpu_ms": t_up[1],
                           "needed_layers_ms": t_need[0], "needed_layers_cpu_ms": t_need[1]}
    out["bert"] = res
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
