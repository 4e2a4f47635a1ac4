"""The convert-once cache: keyed by content, atomic, self-healing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dora_primespeech_mlx import convert
from dora_primespeech_mlx.weights import cache as weights_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_PRIMESPEECH_MLX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


def _fake_loader(calls):
    def load(path):
        calls.append(path)
        data = path.read_bytes()
        if path.suffix == ".safetensors" and not data.startswith(b"CACHE:"):
            raise ValueError("not a cache file")
        return data.removeprefix(b"CACHE:")

    def save(model, path):
        path.write_bytes(b"CACHE:" + model)

    return load, save


def test_first_load_converts_then_reads_the_cache(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-v1")
    calls = []
    load, save = _fake_loader(calls)
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v1"
    assert calls == [src]
    entries = list(cache.glob("t2s-*.safetensors"))
    assert len(entries) == 1 and f"-c{weights_cache.CONVERTER_VERSION}" in entries[0].name
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v1"
    assert calls[-1] == entries[0]


def test_changed_content_gets_a_new_entry(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-v1")
    load, save = _fake_loader([])
    weights_cache.load_cached("t2s", src, load, save)
    src.write_bytes(b"weights-v2-longer")
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v2-longer"
    assert len(list(cache.glob("t2s-*.safetensors"))) == 2


def test_interrupted_conversion_leaves_no_entry(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    load, _ = _fake_loader([])

    def save_and_die(model, path):
        path.write_bytes(b"CACHE:partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        weights_cache.load_cached("t2s", src, load, save_and_die)
    assert list(cache.glob("*.safetensors")) == [] and list(cache.glob(".*tmp*")) == []


def test_damaged_entry_is_rebuilt(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    load, save = _fake_loader([])
    weights_cache.load_cached("t2s", src, load, save)
    (entry,) = cache.glob("t2s-*.safetensors")
    entry.write_bytes(b"garbage")
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights"
    assert entry.read_bytes() == b"CACHE:weights"


def test_missing_source_names_the_file(cache, tmp_path):
    load, save = _fake_loader([])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        weights_cache.load_cached("t2s", tmp_path / "nope.ckpt", load, save)


def test_real_t2s_round_trip(cache, fixtures, tmp_path):
    from dora_primespeech_mlx.models.t2s_io import load_t2s

    src = tmp_path / "gpt.ckpt"
    shutil.copy(fixtures.gpt_path, src)
    first = convert.load_t2s_cached(src)
    (entry,) = cache.glob("t2s-*.safetensors")
    second = convert.load_t2s_cached(src)
    direct = load_t2s(entry)
    w1 = dict(first.parameters()["ar_predict_layer"])["weight"]
    w2 = dict(second.parameters()["ar_predict_layer"])["weight"]
    np.testing.assert_array_equal(np.array(w1), np.array(w2))
    assert direct.config == first.config


def test_hf_folder_is_cached_as_safetensors(cache, fixtures, tmp_path, monkeypatch):
    from dora_primespeech_mlx.weights import state_dict as checkpoint  # where load_hf_weights finds it

    folder = tmp_path / "hubert"
    shutil.copytree(fixtures.hubert_dir, folder)
    first = weights_cache.load_hf_weights_cached(folder)
    (entry,) = cache.glob("hf-*.safetensors")
    # a second load reads the cache: the torch pickle is never opened again
    monkeypatch.setattr(checkpoint, "read_torch_file", lambda *a, **k: pytest.fail("read the .bin again"))
    second = weights_cache.load_hf_weights_cached(folder)
    assert set(first) == set(second) and "encoder.pos_conv_embed.conv.weight_g" in second
    for key in first:
        assert second[key].dtype == first[key].dtype
        np.testing.assert_array_equal(second[key], first[key])
