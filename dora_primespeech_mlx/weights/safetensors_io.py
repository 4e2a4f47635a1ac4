"""Reading `.safetensors` without trusting the header: sizes, offsets and dtypes checked, memory
charged to the same budget as torch files."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .common import _COST_OBJ, _MAX_DIM, MAX_NDIM, CheckpointError, _Budget, short_repr

# ----------------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {
    "F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
_COST_JSON_BYTE = 32  # upper bound of Python objects per byte of JSON ("{}" is a 64-byte dict)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file into numpy arrays (bfloat16 is widened to float32).

    The header is validated before any tensor is read: known dtypes, shapes of non-negative
    integers, byte ranges inside the data area that match the shapes and do not overlap.
    """
    return _read(path, mmap=False)


def memmap_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a `.safetensors` file as read-only views of one memory map: nothing is read
    until a tensor's pages are touched, and processes that map the same file share its pages.

    The header is validated as in `read_safetensors`; bfloat16 tensors (which numpy cannot view)
    are read and widened to float32 at once. The map stays open while any view is alive.
    """
    return _read(path, mmap=True)


def _read(path: str | Path, *, mmap: bool) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with-block below
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: safetensors file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file ({what}); the file is damaged, re-download it")

    with fh:
        size = os.fstat(fh.fileno()).st_size
        budget = _Budget(path, size)
        head = fh.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _SAFETENSORS_MAX_HEADER:
            raise bad(f"header of {n:,} bytes in a {size:,}-byte file")
        budget.charge(n * _COST_JSON_BYTE, "the safetensors header")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad(f"header is not JSON: {type(exc).__name__}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise bad("__metadata__ is not a map of strings")
        plan: list[tuple[int, int, str, str, tuple[int, ...]]] = []
        for key, info in header.items():
            if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
                raise bad(f"entry {key[:80]!r} is not {{dtype, shape, data_offsets}}")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in _SAFETENSORS_DTYPES:
                raise bad(f"tensor {key[:80]!r} has unsupported dtype {short_repr(dtype)}")
            if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                    and all(type(s) is int and 0 <= s <= _MAX_DIM for s in shape)
                    and math.prod(s for s in shape if s) < 2**62):
                raise bad(f"tensor {key[:80]!r} has shape {short_repr(shape)}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_len):
                raise bad(f"tensor {key[:80]!r} has byte range {short_repr(offsets)} outside the {data_len}-byte data")
            itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
            if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
                raise bad(f"tensor {key[:80]!r}: shape {shape} x {itemsize} bytes != byte range {offsets}")
            plan.append((offsets[0], offsets[1], key, dtype, tuple(shape)))
        by_offset = sorted(plan)
        for (_a0, a1, a_key, _d, _s), (b0, _b1, b_key, _d2, _s2) in itertools.pairwise(by_offset):
            if b0 < a1:
                raise bad(f"tensors {a_key[:80]!r} and {b_key[:80]!r} overlap")
        out: dict[str, np.ndarray] = {}
        mapped = np.memmap(fh, dtype=np.uint8, mode="r") if mmap and data_len else None
        for begin, end, key, dtype, shape in plan:  # header order
            np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
            if mapped is not None and dtype != "BF16":  # a view: no read, no memory charged
                out[key] = mapped[data_start + begin:data_start + end].view(np_dtype).reshape(shape)
                continue
            budget.charge((end - begin) * (2 if dtype == "BF16" else 1) + _COST_OBJ, f"tensor {key[:80]!r}")
            arr = np.empty(shape, dtype=np_dtype)
            fh.seek(data_start + begin)
            if end > begin and fh.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != end - begin:
                raise bad(f"tensor {key[:80]!r} is truncated")
            if dtype == "BF16":
                wide = arr.astype(np.uint32)
                wide <<= 16
                arr = wide.view(np.float32)
            out[key] = arr
    return out


