"""Run the converted encoders with Core ML on the Neural Engine (macOS, `USE_ANE=1`), else fall back.

`load_coreml_encoders()` returns `CoreMLEncoders` (a HuBERT and a BERT with the same call signatures
as the MLX ones: `hubert(wav16k) -> (768, T)`, `bert.phone_features(norm_text, word2ph)`) or `None`
after one log line saying why, in which case the engine keeps its MLX encoders. Packages are compiled
to `.mlmodelc` once (next to the package, redone when the package changes) and loaded once per
process with `compute_units=CPU_AND_NE`.

Copies between Core ML and MLX, per call (each is unavoidable with the coremltools Python API):
1. input: the float32 waveform / int token ids are written into a zero-padded fp16 / int32 bucket
   array (the padding is required by the enumerated shapes; the fp16 cast is the model's input type).
2. output: `CompiledMLModel.predict` copies the MLMultiArray into a new numpy array (coremltools
   has no zero-copy output binding).
3. the valid frames are sliced (a view: the output is already channels-first, i.e. the `(C, T)`
   layout the pipeline uses, so there is no transpose) and cast fp16 -> float32, one copy at the
   smallest size (BERT: per character, before `word2ph` repetition builds the phone-level array).
The float32 numpy result then enters MLX exactly as the MLX encoders' numpy output does (one
`mx.array` copy in the consumer, `extract_latent` / the GPT).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import default_coreml_dir, moyoyo_dir, spec

logger = logging.getLogger(__name__)

__all__ = ["CoreMLBert", "CoreMLEncoders", "CoreMLHubert", "coreml_unavailable_reason", "load_coreml_encoders"]

_LOADED: dict[str, Any] = {}  # compiled model path -> CompiledMLModel, shared by every engine in the process
_LOCK = threading.Lock()


def coreml_unavailable_reason(use_ane: bool) -> str | None:
    """Why Core ML cannot run here (`None` when it can be tried)."""
    if not use_ane:
        return "USE_ANE is off"
    if sys.platform != "darwin":
        return f"Core ML runs only on macOS (this is {sys.platform})"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return "coremltools is not installed (pip install 'dora-primespeech-mlx[coreml]')"
    return None


def _compiled(package: Path):
    """Load `package` compiled once to `<name>.mlmodelc` (recompiled when the package is newer)."""
    import coremltools as ct

    compiled = package.with_suffix(".mlmodelc")
    key = str(compiled)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        stamp = (package / "Manifest.json").stat().st_mtime_ns
        if not compiled.is_dir() or compiled.stat().st_mtime_ns < stamp:
            tmp = compiled.with_name(f".tmp-{compiled.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            ct.utils.compile_model(str(package), str(tmp))
            shutil.rmtree(compiled, ignore_errors=True)
            tmp.rename(compiled)
        model = ct.models.CompiledMLModel(str(compiled), compute_units=ct.ComputeUnit.CPU_AND_NE)
        _LOADED[key] = model
        return model


def _bucket(n: int, buckets: Sequence[int]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class CoreMLHubert:
    """CNHubert on Core ML; `__call__` matches `models.hubert.HubertModel.__call__`."""

    def __init__(self, model, lengths: Sequence[int], fallback: Callable[[], Callable] | None = None):
        self.model = model
        self.lengths = sorted(lengths)
        self._fallback = fallback

    def __call__(self, wav16k: np.ndarray) -> np.ndarray:
        """Last hidden state `(768, T)` float32 of a raw 16 kHz waveform (already zero-padded by 0.6 s)."""
        wav = np.asarray(wav16k, dtype=np.float32)
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise ValueError(f"hubert expects a mono waveform of shape (N,) or (1, N), got {wav.shape}")
        n = wav.shape[0]
        if spec.hubert_frames(n) < 1:
            raise ValueError(f"hubert needs at least 400 samples (one frame), got {n}")
        bucket = _bucket(n, self.lengths)
        if bucket is None:
            if self._fallback is None:
                raise ValueError(f"{n} samples exceed the largest Core ML HuBERT bucket ({self.lengths[-1]}); "
                                 "reconvert with a larger --hubert-seconds")
            logger.info("HuBERT: %d samples exceed the Core ML buckets; running MLX for this one", n)
            return self._fallback()(wav)
        x = np.zeros((1, 1, 1, bucket), np.float16)
        x[0, 0, 0, :n] = wav  # copy 1: pad + cast
        out = self.model.predict({spec.HUBERT_INPUT: x, spec.HUBERT_LENGTH: np.array([n], np.int32)})  # copy 2
        return out[spec.HUBERT_OUTPUT][0, :, 0, : spec.hubert_frames(n)].astype(np.float32)  # copy 3


class CoreMLBert:
    """RoBERTa on Core ML; `phone_features` matches `models.bert.BertEncoderModel.phone_features`."""

    def __init__(self, model, lengths: Sequence[int], tokenizer, fallback: Callable[[], Any] | None = None):
        self.model = model
        self.lengths = sorted(lengths)
        self._tokenizer = tokenizer
        self._fallback = fallback

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with `[CLS]`/`[SEP]` (the folder's tokenizer)."""
        return list(self._tokenizer.encode(text).ids)

    def layer_output(self, ids: Sequence[int]) -> np.ndarray | None:
        """`hidden_states[-3]` as `(hidden, T)` fp16 (a view of the output), or None past the buckets."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        bucket = _bucket(ids.size, self.lengths)
        if bucket is None:
            return None
        x = np.zeros((1, bucket), np.int32)
        x[0, : ids.size] = ids  # copy 1
        out = self.model.predict({spec.BERT_INPUT: x, spec.BERT_LENGTH: np.array([ids.size], np.int32)})  # copy 2
        return out[spec.BERT_OUTPUT][0, :, 0, : ids.size]

    def phone_features(self, norm_text: str, word2ph: Sequence[int]) -> np.ndarray:
        """Phone-level features `(1024, sum(word2ph))` float32, as GPT-SoVITS builds them."""
        from ..models.bert import checked_word2ph

        ids = self.tokenize(norm_text)
        word2ph = checked_word2ph(norm_text, word2ph, len(ids))
        hidden = self.layer_output(ids)
        if hidden is None:
            if self._fallback is None:
                raise ValueError(f"{len(ids)} tokens exceed the largest Core ML BERT bucket ({self.lengths[-1]})")
            logger.info("BERT: %d tokens exceed the Core ML buckets; running MLX for this sentence", len(ids))
            return self._fallback().phone_features(norm_text, word2ph)
        chars = hidden[:, 1 : 1 + len(word2ph)].astype(np.float32)  # copy 3, per character: drop [CLS]/[SEP]
        return np.repeat(chars, word2ph, axis=1)


@dataclass
class CoreMLEncoders:
    hubert: CoreMLHubert
    bert: CoreMLBert
    directory: Path


def _check_manifest(directory: Path, moyoyo: Path) -> tuple[dict | None, str | None]:
    path = directory / spec.MANIFEST
    if not path.is_file():
        return None, f"no converted packages in {directory} (run: gpt-sovits-mlx convert --coreml)"
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None, f"{path} is damaged (run: gpt-sovits-mlx convert --coreml)"
    if manifest.get("format") != spec.FORMAT:
        return None, f"{path} has format {manifest.get('format')!r}, expected {spec.FORMAT!r} (reconvert)"
    for name, folder in (("hubert", "chinese-hubert-base"), ("bert", "chinese-roberta-wwm-ext-large")):
        entry = manifest.get(name)
        if not entry or not (directory / entry["package"]).is_dir():
            return None, f"{directory} lacks the {name} package (run: gpt-sovits-mlx convert --coreml)"
        src = moyoyo / folder
        # stat first (free); only when it differs (e.g. a copied folder) hash the weights to be sure
        if entry.get("source_stat") != spec.source_stat(src) and entry.get("digest") != spec.weights_digest(src):
            return None, f"the {name} package in {directory} was converted from other weights than {src} (reconvert)"
    return manifest, None


def load_coreml_encoders(model_dir: str | Path, *, use_ane: bool, coreml_dir: str | Path | None = None,
                         hubert_fallback: Callable[[], Callable] | None = None,
                         bert_fallback: Callable[[], Any] | None = None) -> CoreMLEncoders | None:
    """Both encoders on Core ML (`CPU_AND_NE`), or None after one log line saying why.

    `model_dir` is the $PRIMESPEECH_MODEL_DIR (or its `moyoyo/`); `coreml_dir` defaults to
    `default_coreml_dir(model_dir)`, where `convert_coreml` writes. The fallbacks are zero-argument
    callables returning the MLX HuBERT / BERT, used only for inputs longer than the largest bucket.
    """
    reason = coreml_unavailable_reason(use_ane)
    if reason is not None:
        (logger.info if not use_ane else logger.warning)("encoders: MLX (%s)", reason)
        return None
    moyoyo = moyoyo_dir(model_dir)
    directory = Path(coreml_dir) if coreml_dir is not None else default_coreml_dir(model_dir)
    manifest, reason = _check_manifest(directory, moyoyo)
    if reason is not None:
        logger.warning("encoders: MLX (%s)", reason)
        return None
    try:
        from ..models.bert import load_tokenizer

        hubert = CoreMLHubert(_compiled(directory / manifest["hubert"]["package"]), manifest["hubert"]["lengths"],
                              hubert_fallback)
        bert = CoreMLBert(_compiled(directory / manifest["bert"]["package"]), manifest["bert"]["lengths"],
                          load_tokenizer(moyoyo / "chinese-roberta-wwm-ext-large"), bert_fallback)
    except Exception as exc:  # noqa: BLE001 - any Core ML failure must leave the MLX path working
        logger.warning("encoders: MLX (loading the Core ML packages from %s failed: %s)", directory, exc)
        return None
    logger.info("encoders: Core ML on the Neural Engine (%s)", directory)
    return CoreMLEncoders(hubert, bert, directory)
