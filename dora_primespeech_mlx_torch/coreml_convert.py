"""Convert CNHubert and RoBERTa to fp16 Core ML `.mlpackage`s for the Neural Engine (needs `[coreml]`).

    python -m dora_primespeech_mlx_torch.coreml_convert MOYOYO_DIR OUT_DIR [--models hubert,bert]
        [--hubert-seconds 4,5,...] [--bert-lengths 16,24,...]

MOYOYO_DIR holds `chinese-hubert-base/` and `chinese-roberta-wwm-ext-large/` (HF folders). OUT_DIR
receives `hubert.mlpackage`, `bert.mlpackage` and `coreml_manifest.json` (buckets, I/O names, a
digest of the source weights so the runtime can tell a stale package). Usually called through
`dora_primespeech_mlx.coreml.convert_coreml`, which runs this in a subprocess so the engine
process never imports torch. Runs on Linux too (conversion only; prediction needs macOS).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dora_primespeech_mlx.constants import HUBERT_RATE
from dora_primespeech_mlx.coreml import spec
from dora_primespeech_mlx_torch.ane_encoders import build_bert, build_hubert

logger = logging.getLogger("dora_primespeech_mlx_torch.coreml_convert")

# fp16 I/O needs macOS 13; 14 is the floor of current MLX wheels, so nothing is lost.
DEPLOYMENT_TARGET = "macOS14"


def _convert(module: torch.nn.Module, example: tuple[torch.Tensor, ...], inputs: list, output: str):
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    return ct.convert(
        traced,
        inputs=inputs,
        outputs=[ct.TensorType(name=output, dtype=np.float16)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_units=ct.ComputeUnit.CPU_AND_NE,
    )


def convert_hubert(folder: Path, seconds: list[int]):
    """Core ML HuBERT over enumerated waveform lengths (`seconds` x 16 kHz samples)."""
    import coremltools as ct

    model = build_hubert(folder)
    lengths = sorted(int(s * HUBERT_RATE) for s in seconds)
    example = (torch.zeros(1, 1, 1, lengths[0]), torch.tensor([lengths[0]], dtype=torch.int32))
    shapes = ct.EnumeratedShapes(shapes=[(1, 1, 1, n) for n in lengths], default=(1, 1, 1, lengths[0]))
    inputs = [ct.TensorType(name=spec.HUBERT_INPUT, shape=shapes, dtype=np.float16),
              ct.TensorType(name=spec.HUBERT_LENGTH, shape=(1,), dtype=np.int32)]
    mlmodel = _convert(model, example, inputs, spec.HUBERT_OUTPUT)
    mlmodel.short_description = "CNHubert last hidden state (fp16, channels first), padded input masked by num_samples"
    return mlmodel, {"lengths": lengths, "frames": [spec.hubert_frames(n) for n in lengths],
                     "hidden_size": model.encoder.layer_norm.weight.numel()}


def convert_bert(folder: Path, lengths: list[int]):
    """Core ML RoBERTa `hidden_states[-3]` over enumerated token counts."""
    import coremltools as ct

    model = build_bert(folder)
    lengths = sorted(int(n) for n in lengths)
    max_pos = model.embeddings.position_embeddings.num_embeddings
    if lengths[-1] > max_pos:
        raise ValueError(f"BERT bucket {lengths[-1]} exceeds the model's {max_pos} positions")
    example = (torch.zeros(1, lengths[0], dtype=torch.int32), torch.tensor([lengths[0]], dtype=torch.int32))
    shapes = ct.EnumeratedShapes(shapes=[(1, n) for n in lengths], default=(1, lengths[0]))
    inputs = [ct.TensorType(name=spec.BERT_INPUT, shape=shapes, dtype=np.int32),
              ct.TensorType(name=spec.BERT_LENGTH, shape=(1,), dtype=np.int32)]
    mlmodel = _convert(model, example, inputs, spec.BERT_OUTPUT)
    mlmodel.short_description = "RoBERTa hidden_states[-3] (fp16, channels first), padded ids masked by num_tokens"
    return mlmodel, {"lengths": lengths, "layers": len(model.encoder.layer),
                     "hidden_size": model.embeddings.LayerNorm.weight.numel(),
                     "vocab_size": model.embeddings.word_embeddings.num_embeddings}


def _save(mlmodel, dest: Path, info: dict) -> None:
    """Write next to `dest` then swap it in, so a crash never leaves a half-written package."""
    import coremltools as ct

    mlmodel.user_defined_metadata["format"] = spec.FORMAT
    mlmodel.user_defined_metadata["buckets"] = json.dumps(info["lengths"])
    mlmodel.user_defined_metadata["coremltools"] = ct.__version__
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    mlmodel.save(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def convert(moyoyo: Path, out_dir: Path, models: list[str], hubert_seconds: list[int], bert_lengths: list[int]) -> dict:
    """Convert the chosen encoders; returns (and writes) the updated manifest."""
    import coremltools as ct

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / spec.MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("format") != spec.FORMAT:
        manifest = {}
    manifest.update(format=spec.FORMAT, coremltools=ct.__version__, torch=torch.__version__,
                    deployment_target=DEPLOYMENT_TARGET)
    jobs = {"hubert": ("chinese-hubert-base", spec.HUBERT_PACKAGE, lambda f: convert_hubert(f, hubert_seconds)),
            "bert": ("chinese-roberta-wwm-ext-large", spec.BERT_PACKAGE, lambda f: convert_bert(f, bert_lengths))}
    for name in models:
        if name not in jobs:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(jobs)}")
        folder_name, package, fn = jobs[name]
        folder = moyoyo / folder_name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing; put the PrimeSpeech encoders under {moyoyo}")
        t0 = time.perf_counter()
        mlmodel, info = fn(folder)
        t_convert = time.perf_counter() - t0
        _save(mlmodel, out_dir / package, info)
        t_total = time.perf_counter() - t0
        manifest[name] = dict(info, package=package, source=str(folder.resolve()), digest=spec.weights_digest(folder),
                              source_stat=spec.source_stat(folder),
                              convert_seconds=round(t_convert, 1), total_seconds=round(t_total, 1))
        logger.info("%s -> %s in %.1f s (convert %.1f s)", folder, out_dir / package, t_total, t_convert)
        del mlmodel
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("coremltools").setLevel(logging.WARNING)  # one INFO line per removed op otherwise
    p = argparse.ArgumentParser(prog="coreml_convert", description=__doc__.split("\n")[0])
    p.add_argument("moyoyo", type=Path, help="folder holding chinese-hubert-base/ and chinese-roberta-wwm-ext-large/")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--models", default="hubert,bert")
    p.add_argument("--hubert-seconds", default=",".join(map(str, spec.HUBERT_BUCKET_SECONDS)))
    p.add_argument("--bert-lengths", default=",".join(map(str, spec.BERT_BUCKETS)))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    manifest = convert(args.moyoyo, args.out_dir, [m for m in args.models.split(",") if m],
                       _ints(args.hubert_seconds), _ints(args.bert_lengths))
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
