"""Core ML stage checks that need torch/transformers/coremltools (oracle python only).

    python refs_coreml.py equiv MOYOYO_DIR WAV16K.npy IDS.npy OUT.json
        Max abs differences (fp32) between the ANE re-writes (dora_primespeech_mlx_torch.ane_encoders,
        built from the HF folders by the torch-free reader) and the upstream transformers models
        loaded with `from_pretrained`: HuBERT last hidden state, RoBERTa hidden_states[-3]; each
        unpadded and zero-padded to a bucket with the length input masking the padding.
    python refs_coreml.py describe OUT.json PACKAGE.mlpackage...
        Inputs, outputs (names, dtypes, enumerated shapes), spec version and weight dtypes of saved
        packages, read with coremltools (works on Linux; prediction does not).

The repository root must be on PYTHONPATH (the test sets it).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def equiv(moyoyo: Path, wav_path: Path, ids_path: Path, out: Path) -> None:
    import torch
    from transformers import BertForMaskedLM, HubertModel

    from dora_primespeech_mlx.coreml.spec import hubert_frames
    from dora_primespeech_mlx_torch.ane_encoders import build_bert, build_hubert

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    res: dict[str, float | int] = {}

    wav = np.load(wav_path).astype(np.float32).reshape(-1)
    n = wav.shape[0]
    hf = HubertModel.from_pretrained(str(moyoyo / "chinese-hubert-base"), local_files_only=True).float().eval()
    ref = hf(torch.from_numpy(wav)[None])["last_hidden_state"][0].T.numpy()  # (768, T)
    ane = build_hubert(moyoyo / "chinese-hubert-base")
    t = hubert_frames(n)
    assert ref.shape[1] == t, (ref.shape, t)
    exact = ane(torch.from_numpy(wav).view(1, 1, 1, -1), torch.tensor([n], dtype=torch.int32))[0, :, 0].numpy()
    padded_wav = np.zeros(n + 16000 + 123, np.float32)  # a bucket-like pad that is not frame-aligned
    padded_wav[:n] = wav
    padded = ane(torch.from_numpy(padded_wav).view(1, 1, 1, -1), torch.tensor([n], dtype=torch.int32))[0, :, 0].numpy()
    res.update(hubert_frames=t, hubert_ref_max=float(np.abs(ref).max()),
               hubert_exact=_max_diff(exact, ref), hubert_padded=_max_diff(padded[:, :t], ref),
               hubert_padded_frames=int(padded.shape[1]))
    del hf, ane

    ids = np.load(ids_path).astype(np.int64).reshape(-1)
    s = ids.shape[0]
    hf = BertForMaskedLM.from_pretrained(str(moyoyo / "chinese-roberta-wwm-ext-large"), local_files_only=True)
    hf = hf.float().eval()
    hs = hf(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)["hidden_states"]
    ref = hs[-3][0].T.numpy()  # (1024, S)
    ane = build_bert(moyoyo / "chinese-roberta-wwm-ext-large")
    exact = ane(torch.from_numpy(ids)[None].int(), torch.tensor([s], dtype=torch.int32))[0, :, 0].numpy()
    pad_ids = np.zeros(16 if s < 16 else 2 * s, np.int64)
    pad_ids[:s] = ids
    padded = ane(torch.from_numpy(pad_ids)[None].int(), torch.tensor([s], dtype=torch.int32))[0, :, 0].numpy()
    res.update(bert_tokens=s, bert_layers=len(ane.encoder.layer), bert_ref_max=float(np.abs(ref).max()),
               bert_exact=_max_diff(exact, ref), bert_padded=_max_diff(padded[:, :s], ref))
    out.write_text(json.dumps(res, indent=1))


def _feature(f) -> dict:
    from coremltools.proto import FeatureTypes_pb2 as ft

    arr = f.type.multiArrayType
    dtype = ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
    which = arr.WhichOneof("ShapeFlexibility")
    enumerated = [list(s.shape) for s in arr.enumeratedShapes.shapes] if which == "enumeratedShapes" else []
    return {"dtype": dtype, "shape": list(arr.shape), "flexibility": which, "enumerated": enumerated}


def describe(out: Path, packages: list[Path]) -> None:
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    res = {}
    for pkg in packages:
        spec = ct.utils.load_spec(str(pkg))
        weights = Counter()
        ops = Counter()
        for fn in spec.mlProgram.functions.values():
            for block in fn.block_specializations.values():
                for op in block.operations:
                    ops[op.type] += 1
                    if op.type == "const":
                        val = op.attributes["val"]
                        if val.type.WhichOneof("type") == "tensorType" and val.WhichOneof("value") == "blobFileValue":
                            weights[MIL_pb2.DataType.Name(val.type.tensorType.dataType)] += 1
        main = spec.mlProgram.functions["main"]
        block = main.block_specializations[main.opset]
        produced = {o.name: o.type.tensorType for op in block.operations for o in op.outputs}
        mil_outputs = {}
        for name in block.outputs:
            t = produced[name]
            dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions]
            mil_outputs[name] = {"dtype": MIL_pb2.DataType.Name(t.dataType), "dims": dims}
        res[pkg.name] = {
            "mil_outputs": mil_outputs,
            "spec_version": spec.specificationVersion,
            "model_type": spec.WhichOneof("Type"),
            "inputs": {f.name: _feature(f) for f in spec.description.input},
            "outputs": {f.name: _feature(f) for f in spec.description.output},
            "blob_weight_dtypes": dict(weights),
            "ops": dict(ops),
            "metadata": dict(spec.description.metadata.userDefined),
        }
    out.write_text(json.dumps(res, indent=1))


def main(argv: list[str]) -> int:
    if argv[1] == "equiv":
        equiv(Path(argv[2]), Path(argv[3]), Path(argv[4]), Path(argv[5]))
    elif argv[1] == "describe":
        describe(Path(argv[2]), [Path(p) for p in argv[3:]])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
