"""The torch-free reader against torch.load (digests written by the oracle) and against hostile files."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx.checkpoint import (
    CheckpointError,
    HParams,
    fuse_weight_norm,
    load_hf_weights,
    normalize_weight_norm_names,
    read_safetensors,
    read_torch_file,
    to_plain,
)

FILES = {
    "GPT_weights/doubao-mixed.ckpt": 295,
    "SoVITS_weights/doubao-mixed.pth": 673,
    "chinese-hubert-base/pytorch_model.bin": 211,
    "chinese-roberta-wwm-ext-large/pytorch_model.bin": None,
}


def digest(arr: np.ndarray) -> list:
    arr = np.ascontiguousarray(arr)
    return [str(arr.dtype), list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]


@pytest.fixture(scope="module")
def reader_refs(fixtures):
    return json.loads((fixtures.root / "reader_refs.json").read_text())


@pytest.mark.parametrize("rel", list(FILES))
def test_reader_equals_torch_load(fixtures, reader_refs, rel):
    ckpt = read_torch_file(fixtures.moyoyo / rel)
    obj = ckpt.obj
    expected = reader_refs[rel]
    state = obj["weight"] if expected["top_level"] else obj
    assert set(state) == set(expected["tensors"])
    if FILES[rel] is not None:
        assert len(state) == FILES[rel]
    for key, value in state.items():
        assert digest(value) == expected["tensors"][key], key
    if expected["top_level"]:
        assert list(obj.keys()) == expected["top_level"]
        assert to_plain(obj["config"]) == expected["config"]
        assert obj["info"] == expected["info"]
    assert ckpt.version_tag is None


def test_archive_folder_is_not_assumed(fixtures):
    # upstream saves through "<time>.pth", so the folder inside the zip is that stem
    ckpt = read_torch_file(fixtures.gpt_path)
    assert ckpt.archive_folder not in ("", "archive")
    with zipfile.ZipFile(fixtures.gpt_path) as zf:
        assert f"{ckpt.archive_folder}/data.pkl" in zf.namelist()


def test_sovits_config_is_hparams(fixtures):
    cfg = read_torch_file(fixtures.sovits_path).obj["config"]
    assert isinstance(cfg, HParams) and isinstance(cfg["model"], HParams)
    assert cfg.model.upsample_rates == [10, 8, 2, 2, 2]
    assert cfg.data.hop_length == 640


def test_version_tag_is_read(fixtures, tmp_path):
    raw = fixtures.sovits_path.read_bytes()
    tagged = tmp_path / "v2pro.pth"
    tagged.write_bytes(b"05" + raw[2:])
    ckpt = read_torch_file(tagged)
    assert ckpt.version_tag == "v2Pro"
    assert len(ckpt.obj["weight"]) == 673


def test_hf_folder_both_weight_norm_namings(fixtures, tmp_path):
    from safetensors.numpy import save_file

    legacy = load_hf_weights(fixtures.hubert_dir)
    assert "encoder.pos_conv_embed.conv.weight_g" in legacy
    renamed = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1"): v
        for k, v in legacy.items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    modern = load_hf_weights(tmp_path)
    assert set(modern) == set(legacy)
    for k in legacy:
        np.testing.assert_array_equal(modern[k], legacy[k])
    assert set(read_safetensors(tmp_path / "model.safetensors")) == set(renamed)


def test_normalize_names_is_idempotent():
    w = {"a.parametrizations.weight.original0": np.ones(1), "a.parametrizations.weight.original1": np.ones(2)}
    once = normalize_weight_norm_names(w)
    assert set(once) == {"a.weight_g", "a.weight_v"}
    assert normalize_weight_norm_names(once).keys() == once.keys()


def test_fuse_weight_norm_matches_definition():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, 3, 5)).astype(np.float32)
    g = rng.standard_normal((4, 1, 1)).astype(np.float32)
    w = fuse_weight_norm(g, v)
    for o in range(4):
        np.testing.assert_allclose(w[o], g[o] * v[o] / np.linalg.norm(v[o]), rtol=1e-6)
    g2 = rng.standard_normal((1, 1, 5)).astype(np.float32)
    w2 = fuse_weight_norm(g2, v, dim=2)
    for t in range(5):
        np.testing.assert_allclose(w2[:, :, t], g2[0, 0, t] * v[:, :, t] / np.linalg.norm(v[:, :, t]), rtol=1e-6)


# ---------------------------------------------------------------------------- hostile input


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _write_torch_like_zip(path: Path, payload: bytes, folder: str = "archive") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/data.pkl", payload)
        zf.writestr(f"{folder}/version", "3\n")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _write_torch_like_zip(evil, pickle.dumps({"weight": _Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as exc:
        read_torch_file(evil)
    msg = str(exc.value)
    assert str(evil) in msg and ("posix.system" in msg or "os.system" in msg)
    assert not marker.exists()


def test_builtin_eval_is_refused(tmp_path):
    class EvalReduce:
        def __reduce__(self):
            return (eval, ("1+1",))

    path = tmp_path / "eval.pth"
    _write_torch_like_zip(path, pickle.dumps(EvalReduce(), protocol=2), folder="1725955666.654321")
    with pytest.raises(CheckpointError, match=r"(__builtin__|builtins)\.eval"):
        read_torch_file(path)


def test_truncated_file_names_the_file(fixtures, tmp_path):
    raw = fixtures.sovits_path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_torch_file(bad)


def test_corrupt_storage_is_detected(fixtures, tmp_path):
    # shrink one storage so the tensor no longer fits: must not return garbage
    src = fixtures.sovits_path
    bad = tmp_path / "short_storage.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        storages = [n for n in zin.namelist() if "/data/" in n and not n.endswith("serialization_id")]
        victim = max(storages, key=lambda n: zin.getinfo(n).file_size)
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data[:16] if name == victim else data)
    with pytest.raises(CheckpointError, match="short_storage.pth"):
        read_torch_file(bad)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x80\x02}q\x00."])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        read_torch_file(bad)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_torch_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_hf_weights(tmp_path)
