"""Shared by the torch-free readers: the error they raise, bounded reprs, the limits every file is
held to and the allocation budget that enforces them."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file could not be read; the message names the file and what to do."""


class _ShortRepr(reprlib.Repr):
    def repr_ndarray(self, x: np.ndarray, level: int) -> str:  # never numpy's printer (a data-sized walk)
        return f"array(shape={x.shape}, dtype={x.dtype})"


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 40, 40, 40


def short_repr(value: Any) -> str:
    """A bounded repr of a value from a file, for messages: a few levels and items, never a full walk
    (a hostile config can share one list so often that printing it in full would never end)."""
    return _SHORT.repr(value)


# Upstream overwrites the leading b"PK" with a 2-byte tag for newer SoVITS variants
# (process_ckpt.savee); v1/v2 files are untagged zips.
VERSION_TAGS = {
    b"00": "v1",
    b"01": "v2",
    b"02": "v3",
    b"03": "v3",
    b"04": "v4",
    b"05": "v2Pro",
    b"06": "v2ProPlus",
}

_STORAGE_DTYPES = {
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 after reading
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

MAX_DEPTH = 32  # containers nested deeper than this (object tree or config) are refused
MAX_EXPANDED = 2_000_000  # values an object tree may hold counting shared references once per use (real: ~2,000)
MAX_NDIM = 32  # tensor rank (torch allows 64; no GPT-SoVITS tensor has more than 4)
_MAX_DIM = 2**40  # a single dimension of an empty tensor (non-empty ones are bounded by their storage)
_BUDGET_FACTOR = 4  # bytes a read may allocate per byte of file ...
_BUDGET_FLOOR = 256 * 1024  # ... plus this (tiny files: the fixed cost of a few containers)
_MAX_PICKLE = 64 * 1024 * 1024  # data.pkl (real ones: 26-85 KB)
_MAX_META = 4096  # byteorder, version, ... members
_MAX_MARKS = 1024  # nested MARKs in the pickle (real: 3)
_MAX_LONG = 256  # bytes of a pickled int (LONG1/LONG4); a longer one is not a config value
_MAX_GLOBAL_NAME = 256
_MAX_STORAGE_KEY = 64
_ALLOWED_ZIP_FLAGS = 0x0008 | 0x0800  # data descriptor, UTF-8 names: what torch writes (0x808)


class HParams(dict):
    """Stand-in for GPT-SoVITS `utils.HParams`: an attribute bag pickled by its `__dict__`.

    Unpickled as a dict so the config stays plain data; nested HParams become nested HParams.
    """

    def __setstate__(self, state: dict) -> None:
        self.update(state)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


# ------------------------------------------------------------------------------------ budget


class _Budget:
    """What one read may allocate: `_BUDGET_FACTOR` x the file size + `_BUDGET_FLOOR` bytes.

    Charges are upper bounds of what is really allocated (storage buffers and tensors exactly,
    Python objects generously), so the reader's peak stays under the limit whatever the file says.
    Nothing is credited back: a legitimate file needs about 2x (storages read + tensors copied).
    """

    __slots__ = ("limit", "path", "used")

    def __init__(self, path: Path, file_size: int):
        self.path = path
        self.limit = _BUDGET_FACTOR * file_size + _BUDGET_FLOOR
        self.used = 0

    def charge(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise CheckpointError(
                f"{self.path}: {what} would take the reader past {self.limit:,} bytes of memory "
                f"({_BUDGET_FACTOR}x the file size); a real checkpoint needs about 2x, so the file is "
                "damaged or was built to exhaust memory"
            )


# Generous per-object charges (CPython 3.10-3.12, 64-bit): object header + GC header + slack.
_COST_OBJ = 64  # int, float, None-like scalars, an empty container
_COST_ITEM = 16  # one slot of a list/tuple/stack
_COST_DICT_ITEM = 112  # one entry of a dict / OrderedDict (hash table + order node, amortised)
_COST_MEMO = 112  # one memo entry
_COST_ZIP_ENTRY = 320  # one parsed central-directory entry (tuple + name + dict slot)



def release_freed_memory() -> None:
    """Hand memory that loading freed back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    Checkpoint readers allocate numpy arrays of up to tens of MB; once glibc has raised its mmap
    threshold they come from the heap, and after they are freed the heap keeps the pages (measured:
    ~0.3 GB per process after loading a voice and the encoders on Linux). Trimming returns them.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        pass
