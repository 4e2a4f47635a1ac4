"""Core ML encoders: ANE re-writes equal upstream, conversion and package specs (Linux), runtime fallback,
and Core ML vs MLX parity (macOS only).

Conversion and the torch comparisons run in the oracle venv (torch + transformers + coremltools);
this process never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx.constants import HUBERT_RATE
from dora_primespeech_mlx.coreml import convert_coreml, default_coreml_dir, moyoyo_dir, runtime, spec

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tools" / "oracle" / "refs_coreml.py"
# kept small so the whole file stays within the CPU budget: conversion time barely depends on
# the number of buckets, but every bucket is a shape to check
TEST_HUBERT_SECONDS = (4, 5)
TEST_BERT_LENGTHS = (16, 32)


def _oracle(oracle_python: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run([str(oracle_python), str(CHECKS), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def converted(fixtures, oracle_python, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("coreml")
    manifest = convert_coreml(fixtures.model_dir, out, hubert_seconds=TEST_HUBERT_SECONDS,
                              bert_lengths=TEST_BERT_LENGTHS, python=oracle_python)
    return out, manifest


@pytest.fixture(scope="module")
def described(converted, oracle_python, tmp_path_factory) -> dict:
    out, _ = converted
    dest = tmp_path_factory.mktemp("describe") / "spec.json"
    _oracle(oracle_python, "describe", str(dest), str(out / spec.HUBERT_PACKAGE), str(out / spec.BERT_PACKAGE))
    return json.loads(dest.read_text())


# ------------------------------------------------------------------------------- torch side (Linux)


@pytest.mark.slow
def test_ane_rewrites_equal_transformers(fixtures, refs, oracle_python, tmp_path):
    """fp32: ANE layout (1x1 convs, per-head einsum, channel LayerNorm, masked padding) == HF models."""
    np.save(tmp_path / "wav.npy", refs["in_wav16k_padded"])
    np.save(tmp_path / "ids.npy", refs["bert_input_ids"])
    _oracle(oracle_python, "equiv", str(fixtures.moyoyo), str(tmp_path / "wav.npy"), str(tmp_path / "ids.npy"),
            str(tmp_path / "equiv.json"))
    res = json.loads((tmp_path / "equiv.json").read_text())
    n = refs["in_wav16k_padded"].size
    assert res["hubert_frames"] == spec.hubert_frames(n) == refs["hubert_last_hidden"].shape[2]
    assert res["bert_layers"] == 22  # hidden_states[-3] of a 24-layer model
    for key in ("hubert_exact", "hubert_padded", "bert_exact", "bert_padded"):
        assert res[key] <= 1e-3, (key, res)
    # the comparison is not vacuous: activations are O(1)
    assert res["hubert_ref_max"] > 1.0 and res["bert_ref_max"] > 1.0


@pytest.mark.slow
def test_conversion_writes_packages_and_manifest(converted, fixtures):
    out, manifest = converted
    assert (out / spec.HUBERT_PACKAGE / "Manifest.json").is_file()
    assert (out / spec.BERT_PACKAGE / "Manifest.json").is_file()
    assert json.loads((out / spec.MANIFEST).read_text()) == manifest
    assert manifest["format"] == spec.FORMAT
    lengths = [s * HUBERT_RATE for s in TEST_HUBERT_SECONDS]
    assert manifest["hubert"]["lengths"] == lengths
    assert manifest["hubert"]["frames"] == [spec.hubert_frames(n) for n in lengths]
    assert manifest["bert"]["lengths"] == list(TEST_BERT_LENGTHS)
    assert manifest["bert"]["layers"] == 22
    assert manifest["hubert"]["digest"] == spec.weights_digest(fixtures.hubert_dir)
    assert manifest["bert"]["source_stat"] == spec.source_stat(fixtures.bert_dir)
    print("conversion seconds:", {k: manifest[k]["total_seconds"] for k in ("hubert", "bert")})


@pytest.mark.slow
def test_package_specs(described):
    hub, bert = described[spec.HUBERT_PACKAGE], described[spec.BERT_PACKAGE]
    for d in (hub, bert):
        assert d["model_type"] == "mlProgram" and d["spec_version"] >= 8  # macOS 14 target
        assert d["metadata"]["format"] == spec.FORMAT
        # fp16 everywhere: every stored weight, the float input and the output
        assert set(d["blob_weight_dtypes"]) == {"FLOAT16"}, d["blob_weight_dtypes"]
        # the ANE form: native einsum attention, no generic matmul/5-D transposes
        assert "matmul" not in d["ops"] and "linear" not in d["ops"]
    lengths = [s * HUBERT_RATE for s in TEST_HUBERT_SECONDS]
    x = hub["inputs"][spec.HUBERT_INPUT]
    assert x["dtype"] == "FLOAT16" and x["shape"] == [1, 1, 1, lengths[0]]  # default: the smallest bucket
    assert x["flexibility"] == "enumeratedShapes" and x["enumerated"] == [[1, 1, 1, n] for n in lengths]
    assert hub["inputs"][spec.HUBERT_LENGTH] == {"dtype": "INT32", "shape": [1], "flexibility": None, "enumerated": []}
    assert list(hub["outputs"]) == [spec.HUBERT_OUTPUT] and hub["outputs"][spec.HUBERT_OUTPUT]["dtype"] == "FLOAT16"
    assert hub["mil_outputs"][spec.HUBERT_OUTPUT]["dtype"] == "FLOAT16"
    assert hub["mil_outputs"][spec.HUBERT_OUTPUT]["dims"][:3] == [1, 768, 1]  # channels first (B, C, 1, S)
    assert hub["ops"]["einsum"] == 2 * 12 * 12  # scores + values, per head, per layer

    ids = bert["inputs"][spec.BERT_INPUT]
    assert ids["dtype"] == "INT32" and ids["flexibility"] == "enumeratedShapes"
    assert ids["enumerated"] == [[1, n] for n in TEST_BERT_LENGTHS]
    assert bert["inputs"][spec.BERT_LENGTH]["dtype"] == "INT32" and bert["inputs"][spec.BERT_LENGTH]["shape"] == [1]
    assert list(bert["outputs"]) == [spec.BERT_OUTPUT] and bert["outputs"][spec.BERT_OUTPUT]["dtype"] == "FLOAT16"
    assert bert["mil_outputs"][spec.BERT_OUTPUT]["dims"][:3] == [1, 1024, 1]
    assert bert["ops"]["einsum"] == 2 * 16 * 22


# ------------------------------------------------------------------------------- runtime (anywhere)


def test_fallback_logs_one_line_why(fixtures, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=runtime.__name__)
    assert runtime.load_coreml_encoders(fixtures.model_dir, use_ane=False) is None
    assert [r.getMessage() for r in caplog.records] == ["encoders: MLX (USE_ANE is off)"]
    caplog.clear()
    monkeypatch.setattr(sys, "platform", "linux")
    assert runtime.load_coreml_encoders(fixtures.model_dir, use_ane=True) is None
    assert len(caplog.records) == 1 and "only on macOS" in caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING


def test_manifest_checks(fixtures, tmp_path):
    moyoyo = moyoyo_dir(fixtures.model_dir)
    assert moyoyo == fixtures.moyoyo
    manifest, why = runtime._check_manifest(tmp_path, moyoyo)
    assert manifest is None and "convert --coreml" in why
    entry = {"package": "x.mlpackage", "digest": "0" * 64, "source_stat": {}}
    (tmp_path / "x.mlpackage").mkdir()
    (tmp_path / spec.MANIFEST).write_text(json.dumps({"format": spec.FORMAT, "hubert": entry, "bert": entry}))
    manifest, why = runtime._check_manifest(tmp_path, moyoyo)
    assert manifest is None and "other weights" in why  # stale: neither stat nor digest match
    ok = {"package": "x.mlpackage"}
    (tmp_path / spec.MANIFEST).write_text(json.dumps({
        "format": spec.FORMAT,
        "hubert": dict(ok, source_stat=spec.source_stat(fixtures.hubert_dir)),
        "bert": dict(ok, source_stat=spec.source_stat(fixtures.bert_dir))}))
    manifest, why = runtime._check_manifest(tmp_path, moyoyo)
    assert why is None and manifest["format"] == spec.FORMAT
    assert default_coreml_dir(fixtures.model_dir) == default_coreml_dir(fixtures.moyoyo)


class _FakeHubertModel:
    """Stands in for CompiledMLModel: output frame t of channel c = c + t (fp16, channels first)."""

    def __init__(self):
        self.calls = []

    def predict(self, data):
        x, n = data[spec.HUBERT_INPUT], data[spec.HUBERT_LENGTH]
        self.calls.append((x.shape, x.dtype, int(n[0]), float(np.abs(x[..., int(n[0]):]).max(initial=0))))
        t = spec.hubert_frames(x.shape[-1])
        out = (np.arange(768)[:, None] + np.arange(t)[None, :]).astype(np.float16)
        return {spec.HUBERT_OUTPUT: out[None, :, None, :]}


def test_coreml_hubert_pads_to_bucket_and_slices_valid_frames():
    fake = _FakeHubertModel()
    fallback_calls = []
    hub = runtime.CoreMLHubert(fake, [64000, 80000], fallback=lambda: lambda w: fallback_calls.append(w.size) or "mlx")
    wav = np.random.default_rng(0).standard_normal(57600).astype(np.float32) * 0.1
    out = hub(wav[None])
    assert fake.calls == [((1, 1, 1, 64000), np.float16, 57600, 0.0)]  # padded with zeros, length passed
    t = spec.hubert_frames(57600)
    assert out.shape == (768, t) and out.dtype == np.float32 and t == 179
    np.testing.assert_array_equal(out, (np.arange(768)[:, None] + np.arange(t)).astype(np.float16).astype(np.float32))
    assert hub(np.zeros(80001, np.float32)) == "mlx" and fallback_calls == [80001]  # past the buckets: MLX
    with pytest.raises(ValueError, match="400 samples"):
        hub(np.zeros(399, np.float32))


class _FakeBertModel:
    """Output column t = token id t in every channel, so the test can see which rows were kept."""

    def predict(self, data):
        ids, n = data[spec.BERT_INPUT], int(data[spec.BERT_LENGTH][0])
        assert ids.dtype == np.int32 and ids.shape[1] in (16, 32) and not ids[0, n:].any()
        out = np.broadcast_to(ids.astype(np.float16), (1024, ids.shape[1]))
        return {spec.BERT_OUTPUT: out[None, :, None, :].copy()}


def test_coreml_bert_phone_features_layout(fixtures):
    from dora_primespeech_mlx.models.bert import load_tokenizer

    tok = load_tokenizer(fixtures.bert_dir)
    bert = runtime.CoreMLBert(_FakeBertModel(), [16, 32], tok)
    text, word2ph = "你好，世界。", [2, 2, 1, 2, 2, 1]
    ids = bert.tokenize(text)
    feats = bert.phone_features(text, word2ph)
    assert feats.shape == (1024, sum(word2ph)) and feats.dtype == np.float32
    expected = np.repeat(np.array(ids[1:-1], np.float16).astype(np.float32), word2ph)  # [CLS]/[SEP] dropped
    np.testing.assert_array_equal(feats[0], expected)
    np.testing.assert_array_equal(feats[1023], expected)
    with pytest.raises(ValueError, match="largest Core ML BERT bucket"):
        bert.phone_features("你" * 40, [1] * 40)


# ------------------------------------------------------------------------------- macOS only


def _mac_skip_reason() -> str | None:
    if sys.platform != "darwin":
        return "Core ML prediction needs macOS (coremltools cannot run models on Linux)"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return "coremltools missing: pip install 'dora-primespeech-mlx[coreml]'"
    return None


@pytest.mark.skipif(_mac_skip_reason() is not None, reason=str(_mac_skip_reason()))
def test_coreml_matches_mlx_encoders_on_mac(fixtures, refs, tmp_path):
    """fp16 on the Neural Engine vs the fp32 MLX encoders, same inputs (Mac only)."""
    from dora_primespeech_mlx.models.bert import load_bert
    from dora_primespeech_mlx.models.hubert import load_hubert

    python = os.environ.get("DORA_PRIMESPEECH_MLX_CONVERT_PYTHON", sys.executable)
    convert_coreml(fixtures.model_dir, tmp_path, hubert_seconds=(4, 11), bert_lengths=(16, 32), python=python)
    enc = runtime.load_coreml_encoders(fixtures.model_dir, use_ane=True, coreml_dir=tmp_path)
    assert enc is not None, "Core ML packages failed to load; see the log line"

    def close(a, b):
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        return rel, float(np.abs(a - b).max())

    wav = refs["in_wav16k_padded"]
    got, want = enc.hubert(wav), load_hubert(fixtures.hubert_dir)(wav)
    assert got.shape == want.shape
    rel, mx_ = close(got, want)
    print(f"HuBERT Core ML vs MLX: rel L2 {rel:.2e}, max abs {mx_:.3e}")
    assert rel < 1e-2 and mx_ < 0.1  # fp16 through 12 layers

    text, word2ph = "你好，世界。", [2, 2, 1, 2, 2, 1]
    got, want = enc.bert.phone_features(text, word2ph), load_bert(fixtures.bert_dir).phone_features(text, word2ph)
    rel, mx_ = close(got, want)
    print(f"BERT Core ML vs MLX: rel L2 {rel:.2e}, max abs {mx_:.3e}")
    assert rel < 1e-2 and mx_ < 0.1  # fp16 through 22 layers
