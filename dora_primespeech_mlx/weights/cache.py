"""Convert-once cache: the original `.ckpt`/`.pth`/`.bin` files become safetensors that load faster.

Generic: `load_cached(kind, source, load, save)` takes the loader and saver of any model;
`load_hf_weights_cached` is the one for HF folders. Which models are cached is decided above, in
`dora_primespeech_mlx.convert`.

Cache entries are keyed by the source file's content (sha256) and the converter version, so an edited
or replaced checkpoint is converted again and an engine upgrade that changes the format never reads
a stale file. The cache never stands between a user and their checkpoint: whatever goes wrong with
it (a corrupt or unreadable digest index, a read-only or missing cache folder, a damaged entry) is
logged as a WARNING and the source file is read instead.

Digests. Hashing the GPT file (155 MB; 300 MB in fp32) on every load would cost more than the cached
load itself, so the sha256 is remembered in `digests.json` under a stamp of the file: size, mtime,
ctime, inode and device. A replaced file cannot keep that stamp (a rename gives a new inode, a write
or `touch -d` a new ctime, which user code cannot set), and two more checks close the gaps that
remain: a stamp taken within 2 s of the hash is "racy" (a coarse-clock filesystem could give an
edit the same times) and is hashed again, and every reuse also compares a sampled digest (16 blocks
of 64 KiB spread over the file). Measured on the dev machine (2 shared cores, page cache warm):
sha256 of the 155 MB GPT file 0.31 s, of a 300 MB file 0.70 s, on every load if keyed on content
alone; a reuse under the stamp (stat, index read, sampled digest) 1.4 ms.

Concurrency. Entries and the index are written to a temporary name and renamed into place, so an
interrupted conversion never leaves a file that a later load would read, and a reader never sees a
partial one. A per-entry lock file (`flock`) makes a second process that wants the same entry wait
for the first and then read its result instead of converting again; index updates are locked too.
A lock that cannot be taken (no `fcntl`, a read-only folder, 5 minutes of waiting) is skipped: the
atomic renames keep the cache correct without it.

Location: `$DORA_PRIMESPEECH_MLX_CACHE/converted` (default `~/.cache/dora-primespeech-mlx/converted`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..constants import cache_home

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the atomic renames alone keep the cache correct
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
INDEX_NAME = "digests.json"
LOCK_TIMEOUT_S = 300.0
_INDEX_LOCK = threading.Lock()
_RACY_NS = 2_000_000_000  # a stamp this close to its hash may hide a same-tick edit: hash again
_SAMPLE_BLOCKS, _SAMPLE_SIZE = 16, 64 * 1024


def cache_root() -> Path:
    return cache_home() / "converted"


# ----------------------------------------------------------------------------------------- digests


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _sampled_digest(path: Path, size: int) -> str:
    """blake2b of 16 blocks of 64 KiB spread evenly over the file (first and last included)."""
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as fh:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_SIZE:
            h.update(fh.read())
        else:
            step = (size - _SAMPLE_SIZE) / (_SAMPLE_BLOCKS - 1)
            for i in range(_SAMPLE_BLOCKS):
                fh.seek(int(i * step))
                h.update(fh.read(_SAMPLE_SIZE))
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_index(index_path: Path) -> dict[str, Any]:
    """The digest index; anything unreadable counts as empty (with a WARNING), never as an error."""
    try:
        raw = index_path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        logger.warning("cache index %s is unreadable (%s); hashing checkpoints again", index_path, exc)
        return {}
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        logger.warning("cache index %s is corrupt (%s); hashing checkpoints again and rewriting it",
                       index_path, type(exc).__name__)
        return {}
    if not isinstance(index, dict):
        logger.warning("cache index %s is not a JSON object; hashing checkpoints again and rewriting it", index_path)
        return {}
    return index


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("stamp", "sha256", "sample"))
            and isinstance(entry.get("hashed_at_ns"), int) and len(entry["sha256"]) == 64)


@contextlib.contextmanager
def _flock(lock_path: Path, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[bool]:
    """Hold an exclusive `flock` on `lock_path` (yields True), or yield False if it cannot be had."""
    if fcntl is None:
        yield False
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        logger.warning("cannot create the cache lock %s (%s); going on without it", lock_path, exc)
        yield False
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    logger.warning("cache lock %s held for over %.0f s; going on without it", lock_path, timeout)
                    yield False
                    return
                time.sleep(0.05)
            except OSError as exc:
                logger.warning("cannot lock %s (%s); going on without it", lock_path, exc)
                yield False
                return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _record_digest(index_path: Path, key: str, entry: dict[str, Any]) -> None:
    """Store one digest in the index (locked read-modify-write, atomic rename); failures only warn."""
    with _INDEX_LOCK, _flock(index_path.with_name(index_path.name + ".lock"), timeout=10.0):
        index = _read_index(index_path)
        index[key] = entry
        try:
            _atomic_write_bytes(index_path, json.dumps(index).encode())
        except OSError as exc:
            logger.warning("cannot write the cache index %s (%s); checkpoints will be hashed again next time",
                           index_path, exc)


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered under the file's stamp (see the module docstring)."""
    path = Path(path).resolve()
    index_path = cache_root() / INDEX_NAME
    st = path.stat()
    stamp = _stamp(st)
    with _INDEX_LOCK:
        entry = _read_index(index_path).get(str(path))
    if _valid_entry(entry) and entry["stamp"] == stamp:
        changed_after = max(st.st_mtime_ns, st.st_ctime_ns)
        if changed_after + _RACY_NS < entry["hashed_at_ns"] and entry["sample"] == _sampled_digest(path, st.st_size):
            return entry["sha256"]
    for _attempt in range(3):
        hashed_at = time.time_ns()
        digest = _sha256(path)
        after = path.stat()
        if _stamp(after) == stamp:
            break
        stamp, st = _stamp(after), after  # the file changed while it was hashed: hash it again
    else:
        raise OSError(f"{path} keeps changing while it is hashed; try again when it is complete")
    _record_digest(index_path, str(path), {"stamp": stamp, "sha256": digest, "hashed_at_ns": hashed_at,
                                           "sample": _sampled_digest(path, st.st_size)})
    return digest


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- entries


def cache_path(kind: str, source: Path) -> Path:
    return cache_root() / f"{kind}-{file_digest(source)[:24]}-c{CONVERTER_VERSION}.safetensors"


def _load_entry(entry: Path, source: Path, load: Callable[[Path], Any]) -> Any | None:
    """The model from a cache entry, or None if there is none or it is unreadable (then it is removed)."""
    if not entry.is_file():
        return None
    try:
        return load(entry)
    except Exception as exc:  # noqa: BLE001 - a damaged cache must never block synthesis
        logger.warning("cache entry %s is unreadable (%s); converting %s again", entry, exc, source)
        with contextlib.suppress(OSError):
            entry.unlink(missing_ok=True)
        return None


def load_cached(kind: str, source: Path, load: Callable[[Path], Any], save: Callable[[Any, Path], Any]) -> Any:
    """Load `source` through its cache entry, converting (and caching) on the first load.

    `load(path)` must accept both the original file and the cache file; `save(model, path)` writes
    the cache file. A cache entry that fails to load is discarded and rebuilt from the source; a cache
    that cannot be used at all (unreadable index, unwritable folder) is bypassed with a WARNING.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: check the voice's files under $PRIMESPEECH_MODEL_DIR/moyoyo/")
    try:
        before = _stamp(source.stat())
        entry = cache_path(kind, source)
    except OSError as exc:
        logger.warning("conversion cache unavailable (%s); reading %s directly", exc, source)
        return load(source)
    model = _load_entry(entry, source, load)
    if model is not None:
        return model
    with _flock(entry.with_name(entry.name + ".lock")):
        # a process that held the lock may have written the entry while this one waited
        model = _load_entry(entry, source, load)
        if model is not None:
            return model
        t0 = time.perf_counter()
        logger.info("converting %s (%.0f MB) to %s ...", source, source.stat().st_size / 1e6, entry)
        model = load(source)
        try:
            unchanged = _stamp(source.stat()) == before
        except OSError:
            unchanged = False
        if not unchanged:
            logger.warning("%s changed while it was converted; not caching this conversion", source)
            return model
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.{threading.get_ident()}.tmp.safetensors")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            save(model, tmp)
            os.replace(tmp, entry)
            logger.info("converted %s in %.1f s", source.name, time.perf_counter() - t0)
        except OSError as exc:
            logger.warning("cannot write the cache entry %s (%s); %s will be converted again next time",
                           entry, exc, source)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return model


def load_hf_weights_cached(folder: Path, *, mapped: bool = False) -> dict:
    """An HF folder's state dict, read once from `pytorch_model.bin` (torch pickle) and then from a
    safetensors copy of the same tensors in the cache. Folders that already hold `model.safetensors`
    are read directly.

    `mapped`: the tensors of the safetensors file (the folder's own or the cache's copy) come as
    memory-mapped views (`memmap_safetensors`): nothing is read until a tensor is used, so a loader
    that converts tensor by tensor never holds the whole file, and processes that map the same file
    share its pages. The first load of a `pytorch_model.bin` reads it whole once, as ever."""
    from safetensors.numpy import save_file

    from .safetensors_io import memmap_safetensors, read_safetensors
    from .state_dict import load_hf_weights, normalize_weight_norm_names

    read = memmap_safetensors if mapped else read_safetensors
    folder = Path(folder)
    source = folder / "pytorch_model.bin"
    if (folder / "model.safetensors").exists() or not source.is_file():
        return load_hf_weights(folder, mapped=mapped)

    def load(path: Path) -> dict:
        if path.suffix == ".safetensors":
            return normalize_weight_norm_names(read(path))
        return load_hf_weights(folder)

    def save(weights: dict, path: Path) -> None:
        save_file({k: v for k, v in weights.items()}, str(path), metadata={"converter": CONVERTER_VERSION})

    return load_cached("hf", source, load, save)
