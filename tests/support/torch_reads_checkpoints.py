"""Runs in the oracle virtualenv (real torch): load files written by weights/writer.py and describe them.

    python torch_reads_checkpoints.py OUT.json torch FILE...   torch.load(weights_only=True), also with mmap
    python torch_reads_checkpoints.py OUT.json hf KIND DIR     transformers `from_pretrained` (KIND hubert|bert)

Tensors are described by dtype, shape, stride, storage offset, a storage id (equal ids = one shared
storage) and the sha256 of their values; containers keep their type (`OrderedDict`, `utils.HParams`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
import types

import torch


class HParams:
    """GPT-SoVITS utils.HParams, only as far as unpickling needs it."""


HParams.__module__ = "utils"
_utils = types.ModuleType("utils")
_utils.HParams = HParams
sys.modules["utils"] = _utils
torch.serialization.add_safe_globals([HParams])


def describe(obj, storages: dict[int, int]):
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        arr = obj.detach().contiguous().numpy()
        # empty storages have no address to compare (plain loads give them all 0)
        sid = storages.setdefault(storage.data_ptr(), len(storages)) if storage.nbytes() else None
        return {"tensor": str(arr.dtype), "shape": list(obj.shape), "stride": list(obj.stride()),
                "offset": obj.storage_offset(), "storage": sid,
                "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}
    if isinstance(obj, HParams):
        return {"HParams": {k: describe(v, storages) for k, v in vars(obj).items()}}
    if isinstance(obj, collections.OrderedDict):
        return {"OrderedDict": [[k, describe(v, storages)] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"dict": [[k, describe(v, storages)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [describe(v, storages) for v in obj]}
    if isinstance(obj, list):
        return [describe(v, storages) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {"int": str(obj)}  # JSON would round big ints
    return obj


def load_torch(paths: list[str]) -> dict:
    out = {}
    for path in paths:
        plain = describe(torch.load(path, map_location="cpu", weights_only=True), {})
        mapped = describe(torch.load(path, map_location="cpu", weights_only=True, mmap=True), {})
        out[path] = {"plain": plain, "mmap_equal": json.dumps(mapped) == json.dumps(plain)}
    return out


def load_hf(kind: str, folder: str) -> dict:
    from transformers import BertForMaskedLM, HubertModel

    cls = {"hubert": HubertModel, "bert": BertForMaskedLM}[kind]
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    state = model.state_dict()
    digests = {}
    for key, value in state.items():
        arr = value.detach().half().contiguous().numpy() if value.is_floating_point() else value.numpy()
        digests[key] = hashlib.sha256(arr.tobytes()).hexdigest()
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "mismatched": [list(map(str, m)) for m in info.get("mismatched_keys", [])],
            "n_parameters": sum(p.numel() for p in model.parameters()), "digests": digests,
            "config": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}}


def main(argv: list[str]) -> None:
    out, mode, *rest = argv[1:]
    result = load_torch(rest) if mode == "torch" else load_hf(*rest)
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv)
