"""The conversion cache when things go wrong: a corrupt or unwritable index, a checkpoint replaced
under the same size and mtime, a source edited mid-conversion, two processes converting at once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dora_primespeech_mlx.weights import cache as weights_cache

pytestmark = pytest.mark.fast  # oracle-free and quick: part of `pytest -m fast`

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_PRIMESPEECH_MLX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


def _loader(calls: list):
    def load(path: Path) -> bytes:
        calls.append(path)
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            if not data.startswith(b"CACHE:"):
                raise ValueError("not a cache file")
            return data[len(b"CACHE:"):]
        return data

    def save(model: bytes, path: Path) -> None:
        path.write_bytes(b"CACHE:" + model)

    return load, save


def _converted(calls: list) -> int:
    return sum(1 for p in calls if p.suffix != ".safetensors")


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00 not json", b"[1, 2, 3]", b'{"x": 5}', b"{" * 10000,
                                     b'{"/a": {"stamp": 1, "sha256": null}}'])
def test_corrupt_index_is_rebuilt_with_a_warning(cache, tmp_path, caplog, garbage):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-v1")
    cache.mkdir(parents=True)
    (cache / weights_cache.INDEX_NAME).write_bytes(garbage)
    calls: list = []
    load, save = _loader(calls)
    with caplog.at_level(logging.WARNING, logger="dora_primespeech_mlx.weights.cache"):
        assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v1"
    if not garbage.startswith(b'{"'):
        assert any("cache index" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    index = json.loads((cache / weights_cache.INDEX_NAME).read_text())  # healed: valid JSON with the source
    assert str(src.resolve()) in index
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v1"
    assert _converted(calls) == 1


def test_unreadable_and_unwritable_index_still_loads(cache, tmp_path, caplog):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    (cache / weights_cache.INDEX_NAME).mkdir(parents=True)  # a folder where the index file should be
    load, save = _loader([])
    with caplog.at_level(logging.WARNING, logger="dora_primespeech_mlx.weights.cache"):
        assert weights_cache.load_cached("t2s", src, load, save) == b"weights"
        assert weights_cache.load_cached("t2s", src, load, save) == b"weights"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unreadable" in w for w in warnings) and any("cannot write the cache index" in w for w in warnings)
    assert len(list(cache.glob("t2s-*.safetensors"))) == 1  # entries are still cached


def test_unusable_cache_folder_reads_the_source(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DORA_PRIMESPEECH_MLX_CACHE", str(blocker))
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    calls: list = []
    load, save = _loader(calls)
    with caplog.at_level(logging.WARNING, logger="dora_primespeech_mlx.weights.cache"):
        assert weights_cache.load_cached("t2s", src, load, save) == b"weights"
    assert calls == [src]
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_replaced_file_with_same_size_and_mtime_is_not_served_stale(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-AAAA")
    load, save = _loader([])
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-AAAA"
    st = src.stat()
    # same size, same mtime: once written in place, once replaced by a rename (new inode)
    src.write_bytes(b"weights-BBBB")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_mtime_ns == st.st_mtime_ns and src.stat().st_size == st.st_size
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-BBBB"
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"weights-CCCC")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, src)
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-CCCC"


def test_stale_stamp_is_caught_by_the_sampled_digest(cache, tmp_path):
    """Even with a stamp that matches (as a coarse-clock filesystem could give), changed bytes are seen."""
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"x" * 100_000)
    load, save = _loader([])
    weights_cache.load_cached("t2s", src, load, save)
    index_path = cache / weights_cache.INDEX_NAME
    src.write_bytes(b"y" * 100_000)
    index = json.loads(index_path.read_text())
    entry = index[str(src.resolve())]
    entry["stamp"] = weights_cache._stamp(src.stat())  # pretend the stamp did not change ...
    entry["hashed_at_ns"] = time.time_ns() + 10**10  # ... and the hash is not racy
    index_path.write_text(json.dumps(index))
    assert weights_cache.load_cached("t2s", src, load, save) == b"y" * 100_000


def test_racy_stamp_is_hashed_again(cache, tmp_path, monkeypatch):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    load, save = _loader([])
    weights_cache.load_cached("t2s", src, load, save)
    hashed = []
    real = weights_cache._sha256
    monkeypatch.setattr(weights_cache, "_sha256", lambda p: hashed.append(p) or real(p))
    weights_cache.file_digest(src)  # just written and hashed: within the racy window, hashed again
    assert hashed
    index_path = cache / weights_cache.INDEX_NAME
    index = json.loads(index_path.read_text())
    index[str(src.resolve())]["hashed_at_ns"] += 10**10
    index_path.write_text(json.dumps(index))
    hashed.clear()
    weights_cache.file_digest(src)
    assert not hashed  # an old stamp with a matching sample is reused


def test_source_edited_during_conversion_is_not_cached(cache, tmp_path, caplog):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-v1")
    load, save = _loader([])

    def load_then_edit(path: Path) -> bytes:
        data = load(path)
        if path == src:
            src.write_bytes(b"weights-v2")
        return data

    with caplog.at_level(logging.WARNING, logger="dora_primespeech_mlx.weights.cache"):
        weights_cache.load_cached("t2s", src, load_then_edit, save)
    assert not list(cache.glob("t2s-*.safetensors"))
    assert any("changed while it was converted" in r.getMessage() for r in caplog.records)
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights-v2"


_WORKER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from dora_primespeech_mlx.weights import cache as weights_cache
src, log, delay = Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])

def load(path):
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        assert data.startswith(b"CACHE:"), data[:20]
        return data[6:]
    with open(log, "a") as fh:
        fh.write("converted\n")
    return data

def save(model, path):
    with open(path, "wb") as fh:
        fh.write(b"CACHE:")
        fh.flush()
        time.sleep(delay)  # a slow conversion: the other process must wait, not read a partial file
        fh.write(model)

print(weights_cache.load_cached("t2s", src, load, save).decode())
"""


def test_two_processes_converting_at_once(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights-" + b"z" * 1000)
    log = tmp_path / "conversions.log"
    env = dict(os.environ, DORA_PRIMESPEECH_MLX_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT), str(src), str(log), "1.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == src.read_text()
    assert log.read_text().count("converted") == 1  # the second process waited and read the entry
    entries = list(cache.glob("t2s-*.safetensors"))
    assert len(entries) == 1 and entries[0].read_bytes() == b"CACHE:" + src.read_bytes()
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_a_killed_converter_leaves_no_entry_and_no_held_lock(cache, tmp_path):
    src = tmp_path / "voice.ckpt"
    src.write_bytes(b"weights")
    log = tmp_path / "conversions.log"
    env = dict(os.environ, DORA_PRIMESPEECH_MLX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT), str(src), str(log), "60"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not list(cache.glob("t2s-*.safetensors"))
    load, save = _loader([])
    t0 = time.monotonic()
    assert weights_cache.load_cached("t2s", src, load, save) == b"weights"  # the lock died with its holder
    assert time.monotonic() - t0 < 10
    assert len(list(cache.glob("t2s-*.safetensors"))) == 1
