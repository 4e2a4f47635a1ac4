"""The contract between the Core ML converter and the runtime: file names, I/O names, shape buckets.

Stdlib only: the conversion process (torch + coremltools, no mlx) and the engine (mlx, no torch)
both import it.

Sequence lengths are *enumerated* (a fixed list of buckets), not ranged: Core ML runs a
range-flexible model on the Neural Engine only at its default shape and sends every other shape to
the CPU/GPU, while each enumerated shape is compiled for the Neural Engine (Apple's coremltools
"Flexible Input Shapes" guide; Apple engineer's answer in developer forums thread 724930). Inputs are
zero-padded up to the next bucket and a length input masks the padding, so the valid frames are
exactly what an unpadded run gives (see `ane_encoders` for why each masked op is exact).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "dora-primespeech-mlx/coreml-v1"
MANIFEST = "coreml_manifest.json"

HUBERT_PACKAGE = "hubert.mlpackage"
BERT_PACKAGE = "bert.mlpackage"

# HuBERT: raw 16 kHz waveform (already padded with GPT-SoVITS's 0.6 s of zeros) -> last hidden state.
HUBERT_INPUT = "input_values"  # (1, 1, 1, N) float16, N one of the buckets
HUBERT_LENGTH = "num_samples"  # (1,) int32: how many leading samples are real
HUBERT_OUTPUT = "last_hidden_state"  # (1, 768, 1, T_bucket) float16, channels first
# references are 3-10 s (audio.MIN/MAX_REF_SECONDS) plus 0.6 s of zeros: 3.6-10.6 s -> 4..11 s buckets
HUBERT_BUCKET_SECONDS = (4, 5, 6, 7, 8, 9, 10, 11)

# RoBERTa: token ids with [CLS]/[SEP] -> output of layer 22 of 24 (`hidden_states[-3]`).
BERT_INPUT = "input_ids"  # (1, S) int32, S one of the buckets
BERT_LENGTH = "num_tokens"  # (1,) int32
BERT_OUTPUT = "hidden_states"  # (1, 1024, 1, S) float16, channels first
# sentences are short (dora-primespeech splits text at punctuation); at most 512 positions
BERT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def hubert_frames(num_samples: int, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)) -> int:
    """Frames HuBERT's conv stack gives for `num_samples` samples (no padding): 320 samples a frame."""
    n = num_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


WEIGHT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def source_stat(folder: Path) -> dict[str, list[int]]:
    """(size, mtime_ns) of an HF folder's weight files: a cheap "unchanged since conversion" check."""
    out = {}
    for name in WEIGHT_FILES:
        path = Path(folder) / name
        if path.is_file():
            st = path.stat()
            out[name] = [st.st_size, st.st_mtime_ns]
    return out


def weights_digest(folder: Path) -> str:
    """sha256 over an HF folder's config and weight files: changes when the user swaps the model."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
