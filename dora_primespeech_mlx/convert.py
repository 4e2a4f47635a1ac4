"""Convert-once cache: the original `.ckpt`/`.pth` files become safetensors that load faster.

Cache entries are keyed by the source file's content (sha256) and the converter version, so an edited
or replaced checkpoint is converted again and an engine upgrade that changes the format never reads
a stale file. Entries are written to a temporary name and renamed into place, so an interrupted
conversion never leaves a file that a later load would read.

Location: `$DORA_PRIMESPEECH_MLX_CACHE/converted` (default `~/.cache/dora-primespeech-mlx/converted`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
_INDEX_LOCK = threading.Lock()


def cache_root() -> Path:
    root = os.environ.get("DORA_PRIMESPEECH_MLX_CACHE") or "~/.cache/dora-primespeech-mlx"
    return Path(os.path.expandvars(os.path.expanduser(root))) / "converted"


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime) so unchanged files hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    index_path = cache_root() / "digests.json"
    with _INDEX_LOCK:
        try:
            index = json.loads(index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            index = {}
        entry = index.get(str(path))
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with _INDEX_LOCK:
        try:
            index = json.loads(index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            index = {}
        index[str(path)] = {"stamp": stamp, "sha256": digest}
        _atomic_write_bytes(index_path, json.dumps(index).encode())
    return digest


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def cache_path(kind: str, source: Path) -> Path:
    return cache_root() / f"{kind}-{file_digest(source)[:24]}-c{CONVERTER_VERSION}.safetensors"


def load_cached(kind: str, source: Path, load: Callable[[Path], Any], save: Callable[[Any, Path], Any]) -> Any:
    """Load `source` through its cache entry, converting (and caching) on the first load.

    `load(path)` must accept both the original file and the cache file; `save(model, path)` writes
    the cache file. A cache entry that fails to load is discarded and rebuilt from the source.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: check the voice's files under $PRIMESPEECH_MODEL_DIR/moyoyo/")
    entry = cache_path(kind, source)
    if entry.is_file():
        try:
            return load(entry)
        except Exception as exc:  # noqa: BLE001 - a damaged cache must never block synthesis
            logger.warning("cache entry %s is unreadable (%s); converting %s again", entry, exc, source)
            entry.unlink(missing_ok=True)
    t0 = time.perf_counter()
    size_mb = source.stat().st_size / 1e6
    logger.info("converting %s (%.0f MB) to %s ...", source, size_mb, entry)
    model = load(source)
    tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.{threading.get_ident()}.tmp.safetensors")
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        save(model, tmp)
        os.replace(tmp, entry)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("converted %s in %.1f s", source.name, time.perf_counter() - t0)
    return model


def load_t2s_cached(source: Path):
    from .models.t2s import load_t2s, save_t2s_safetensors

    return load_cached("t2s", source, load_t2s, save_t2s_safetensors)


def load_sovits_cached(source: Path):
    from .models.sovits import load_sovits, save_sovits_safetensors

    return load_cached("sovits", source, load_sovits, save_sovits_safetensors)


def load_hf_weights_cached(folder: Path) -> dict:
    """An HF folder's state dict, read once from `pytorch_model.bin` (torch pickle) and then from a
    safetensors copy of the same tensors in the cache. Folders that already hold `model.safetensors`
    are read directly."""
    from safetensors.numpy import save_file

    from .checkpoint import load_hf_weights, normalize_weight_norm_names, read_safetensors

    folder = Path(folder)
    source = folder / "pytorch_model.bin"
    if (folder / "model.safetensors").exists() or not source.is_file():
        return load_hf_weights(folder)

    def load(path: Path) -> dict:
        if path.suffix == ".safetensors":
            return normalize_weight_norm_names(read_safetensors(path))
        return load_hf_weights(folder)

    def save(weights: dict, path: Path) -> None:
        save_file({k: v for k, v in weights.items()}, str(path), metadata={"converter": CONVERTER_VERSION})

    return load_cached("hf", source, load, save)
