"""Torch-free readers for the checkpoint files users already have.

GPT-SoVITS weights come as PyTorch pickles inside a zip (`.ckpt`, `.pth`, HF `pytorch_model.bin`) and
sometimes as HF `model.safetensors`. Reading them needs no torch: the zip holds one pickle
(`<folder>/data.pkl`) whose tensors point at raw storages (`<folder>/data/<key>`).

Every file is treated as hostile, and reading is memory-safe by construction:

- the zip directory is parsed here (not by `zipfile`), member by member; compressed, encrypted,
  overlapping or out-of-file members are refused before a byte of them is read (torch never
  compresses), and every member is read straight into its final buffer and CRC-checked;
- the pickle is run by a small opcode interpreter (`_SafeUnpickler`) that knows the handful of
  globals these files name, never calls anything else, never mutates an object it did not create in
  this load, and charges every object it builds to a budget;
- a tensor is a view of its storage checked before it is taken: offset, sizes and strides are
  non-negative, every element lies inside the storage and the element count is at most the storage's;
- one budget per file (`_Budget`: 4x the file size + 256 KiB) covers the directory, the pickle's
  objects, the storages and the tensors, so no file, however built, makes the reader allocate more;
- the object tree is walked once (with a memo) for cycles and nesting deeper than `MAX_DEPTH`.

Every refusal is a `CheckpointError` that names the file and says what is wrong.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import pickletools
import reprlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPANDED",
    "CheckpointError",
    "HParams",
    "TorchCheckpoint",
    "check_float",
    "check_int",
    "check_int_list",
    "check_state_dict",
    "check_weight_norm_pairs",
    "fuse_weight_norm",
    "load_hf_weights",
    "normalize_weight_norm_names",
    "plain_config",
    "read_json_config",
    "read_safetensors",
    "read_torch_file",
    "short_repr",
    "to_plain",
]


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


# --------------------------------------------------------------------------------------- zip


_BYTES = np.dtype("u1")


@dataclass(frozen=True)
class _Member:
    name: str
    data_offset: int  # absolute offset of the member's first data byte in the file
    size: int
    crc: int


def _u16(b: bytes, o: int) -> int:
    return b[o] | (b[o + 1] << 8)


class _Archive:
    """The members of a torch zip, validated against the file before anything is read.

    Only what torch writes is accepted: stored (uncompressed), unencrypted members whose local
    header agrees with the central directory, lying inside the file and not overlapping. A
    GPT-SoVITS version tag over the leading `PK` is accepted in place of the first signature.
    """

    def __init__(self, path: Path, fh: BinaryIO, size: int, tagged: bool, budget: _Budget):
        self.path, self.fh, self.size, self.tagged, self.budget = path, fh, size, tagged, budget
        self.members: dict[str, _Member] = {}
        self._parse()

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: damaged zip archive ({what}); the file is truncated or corrupt, "
                               "re-download it")

    def _read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise self._damaged(f"{n} bytes at offset {offset} lie outside the {self.size}-byte file")
        self.fh.seek(offset)
        data = self.fh.read(n)
        if len(data) != n:
            raise self._damaged(f"short read at offset {offset}")
        return data

    def _end_record(self) -> tuple[int, int, int]:
        """(number of entries, central directory size, its offset), zip64 aware."""
        # the end record is the last 22 bytes unless a comment follows it (searched as zipfile does)
        tail_len = min(self.size, 22 + 65535)
        tail = self._read_at(self.size - tail_len, tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or pos + 22 > len(tail):
            raise self._damaged("no end-of-central-directory record")
        eocd_at = self.size - tail_len + pos
        (_sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, _clen) = struct.unpack(
            "<4s4H2LH", tail[pos:pos + 22])
        if disk != 0 or cd_disk != 0 or n_here != n_total:
            raise self._damaged("multi-disk archive")
        dir_end = eocd_at
        # torch (miniz) always writes a zip64 end record + locator; then its numbers are the ones that count
        loc_at = eocd_at - 20
        locator = self._read_at(loc_at, 20) if loc_at >= 0 else b""
        if locator[:4] != b"PK\x06\x07":
            if n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
                raise self._damaged("zip64 sizes without a zip64 locator")
        else:
            rec_at = struct.unpack("<Q", locator[8:16])[0]
            record = self._read_at(rec_at, 56)
            if record[:4] != b"PK\x06\x06":
                raise self._damaged("bad zip64 end record")
            n_total, n_here2, cd_size, cd_offset = struct.unpack("<4Q", record[24:56])
            if n_total != n_here2:
                raise self._damaged("multi-disk archive")
            dir_end = rec_at
        if cd_offset + cd_size != dir_end:
            raise self._damaged(f"central directory at {cd_offset}+{cd_size} does not end at {dir_end}")
        # every entry takes at least 46 bytes of the directory
        if n_total > cd_size // 46:
            raise self._damaged(f"{n_total} entries cannot fit a {cd_size}-byte central directory")
        return n_total, cd_size, cd_offset

    def _parse(self) -> None:
        n_entries, cd_size, cd_offset = self._end_record()
        self.budget.charge(n_entries * _COST_ZIP_ENTRY, f"a zip directory of {n_entries:,} entries")
        directory = self._read_at(cd_offset, cd_size)
        self.budget.charge(cd_size, "the zip directory")
        spans: list[tuple[int, int, str]] = []
        pos = 0
        for _ in range(n_entries):
            head = directory[pos:pos + 46]
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                raise self._damaged(f"bad central directory entry at offset {cd_offset + pos}")
            (flags, method, _t, _d, crc, csize, usize, n_name, n_extra, n_comment, disk, _ia, _ea,
             local) = struct.unpack("<2H2H3L3H2HLL", head[8:46])
            raw_name = directory[pos + 46:pos + 46 + n_name]
            extra = directory[pos + 46 + n_name:pos + 46 + n_name + n_extra]
            pos += 46 + n_name + n_extra + n_comment
            if pos > cd_size:
                raise self._damaged("central directory entry runs past the directory")
            if disk not in (0, 0xFFFF):
                raise self._damaged("multi-disk archive")
            usize, csize, local = self._zip64(extra, usize, csize, local)
            try:
                name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            except UnicodeDecodeError:
                raise self._damaged(f"member name {raw_name[:40]!r} is not valid UTF-8") from None
            if method != 0:
                raise CheckpointError(
                    f"{self.path}: member '{name}' is compressed (zip method {method}); PyTorch never "
                    "compresses checkpoint members, so this file was repacked or built to expand in "
                    "memory. Refusing to decompress it; use the original file."
                )
            if flags & ~_ALLOWED_ZIP_FLAGS:
                raise CheckpointError(
                    f"{self.path}: member '{name}' has zip flags {flags:#06x} (encryption or other "
                    "features torch never writes); use the original file"
                )
            if csize != usize:
                raise self._damaged(f"member '{name}' is stored but its sizes differ ({csize} != {usize})")
            if name in self.members:
                raise self._damaged(f"member '{name}' appears twice")
            data_offset = self._local_header(name, raw_name, local)
            if data_offset + usize > cd_offset:
                raise self._damaged(f"member '{name}' ({usize} bytes at {data_offset}) runs into the directory")
            self.members[name] = _Member(name, data_offset, usize, crc)
            spans.append((local, data_offset + usize, name))
        spans.sort()
        for (_a0, a1, a_name), (b0, _b1, b_name) in itertools.pairwise(spans):
            if b0 < a1:
                raise self._damaged(f"members '{a_name}' and '{b_name}' overlap")

    def _zip64(self, extra: bytes, usize: int, csize: int, local: int) -> tuple[int, int, int]:
        if 0xFFFFFFFF not in (usize, csize, local):
            return usize, csize, local
        pos = 0
        while pos + 4 <= len(extra):
            tag, n = _u16(extra, pos), _u16(extra, pos + 2)
            body = extra[pos + 4:pos + 4 + n]
            pos += 4 + n
            if tag != 1:
                continue
            values = [struct.unpack("<Q", body[i:i + 8])[0] for i in range(0, len(body) - 7, 8)]
            fields = [usize, csize, local]
            for i, value in enumerate(fields):
                if value == 0xFFFFFFFF:
                    if not values:
                        raise self._damaged("zip64 extra field too short")
                    fields[i] = values.pop(0)
            return fields[0], fields[1], fields[2]
        raise self._damaged("zip64 sizes without a zip64 extra field")

    def _local_header(self, name: str, raw_name: bytes, offset: int) -> int:
        head = self._read_at(offset, 30)
        signature_ok = head[:4] == b"PK\x03\x04" or (self.tagged and offset == 0 and head[2:4] == b"\x03\x04")
        if not signature_ok:
            raise self._damaged(f"member '{name}' has no local header at offset {offset}")
        method = _u16(head, 8)
        n_name, n_extra = _u16(head, 26), _u16(head, 28)
        if method != 0:
            raise CheckpointError(f"{self.path}: member '{name}' is compressed (local method {method}); "
                                  "PyTorch never compresses checkpoint members. Use the original file.")
        if self._read_at(offset + 30, n_name) != raw_name:
            raise self._damaged(f"member '{name}': local header names another file")
        return offset + 30 + n_name + n_extra

    def read(self, name: str, *, limit: int | None = None, dtype: np.dtype = _BYTES,
             what: str = "member") -> np.ndarray:
        """The member's bytes, read straight into a fresh array (charged to the budget) and CRC-checked."""
        member = self.members[name]
        if limit is not None and member.size > limit:
            raise CheckpointError(f"{self.path}: {what} '{name}' is {member.size:,} bytes, more than the "
                                  f"{limit:,} a checkpoint ever needs; the file is damaged or hostile")
        if member.size % dtype.itemsize:
            raise self._damaged(f"member '{name}' size {member.size} is not a multiple of {dtype.itemsize}")
        self.budget.charge(member.size, f"{what} '{name}'")
        out = np.empty(member.size // dtype.itemsize, dtype=dtype)
        raw = out.view(np.uint8)
        self.fh.seek(member.data_offset)
        if self.fh.readinto(memoryview(raw)) != member.size:
            raise self._damaged(f"member '{name}' is truncated")
        if zlib.crc32(raw) != member.crc:
            raise self._damaged(f"CRC mismatch in member '{name}'")
        return out


# ------------------------------------------------------------------------------------ pickle


class _Global:
    """A global the pickle named and we allow: a plain, immutable token, never a live object."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


_ORDERED_DICT = _Global("collections", "OrderedDict")
_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAMETER = _Global("torch._utils", "_rebuild_parameter")
_HPARAMS = _Global("utils", "HParams")
_STORAGE_GLOBALS = {name: _Global("torch", name) for name in _STORAGE_DTYPES}
_ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
    (g.module, g.name): g for g in (_ORDERED_DICT, _REBUILD_TENSOR, _REBUILD_PARAMETER, _HPARAMS,
                                    *_STORAGE_GLOBALS.values())
}


@dataclass(repr=False)
class _Storage:
    key: str
    type_name: str
    data: np.ndarray  # 1-D, in the storage's own dtype
    handed_out: bool = False  # `data` itself became a tensor: later views of it must copy

    def __repr__(self) -> str:
        return f"<storage '{self.key}' {self.type_name}[{self.data.size}]>"


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    step = 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != step:
            return False
        step *= s
    return True


_OP_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
_SCALAR_KEY_TYPES = (str, int, float, bool, type(None), bytes)


def _is_key(value: Any) -> bool:
    # dict keys must hash without recursion: scalars, or a flat tuple of scalars
    if isinstance(value, _SCALAR_KEY_TYPES):
        return True
    return type(value) is tuple and all(isinstance(v, _SCALAR_KEY_TYPES) for v in value)


class _SafeUnpickler:
    """A pickle interpreter for what `torch.save` writes (protocol 2; protocols 3-4 opcodes too).

    It resolves only `_ALLOWED_GLOBALS` (to immutable tokens), calls only the tensor rebuilders and
    `OrderedDict()`, instantiates only `HParams`, applies BUILD only to an `HParams`/`OrderedDict`
    this very load created, and charges every object to the budget. Text-protocol opcodes,
    extension codes, sets and out-of-band buffers are refused.
    """

    def __init__(self, data: bytes, *, path: Path, budget: _Budget, load_storage):
        self.data = data
        self.path = path
        self.budget = budget
        self.load_storage = load_storage
        self.pos = 0
        self._fresh: set[int] = set()  # ids of HParams/OrderedDicts created by this load
        self._keep: list[Any] = []  # keeps them alive so their ids stay theirs

    # -- errors and reading

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: malformed pickle data ({what} at byte {self.pos}); the file is damaged")

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self._bad(f"a {n}-byte field runs past the end of data.pkl")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def _line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + _MAX_GLOBAL_NAME + 1)
        if end < 0:
            raise self._bad("GLOBAL name too long or unterminated")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self._bad("non-ASCII GLOBAL name") from None

    def _u(self, n: int) -> int:
        return int.from_bytes(self._take(n), "little")

    def _str(self, n: int) -> str:
        raw = self._take(n)
        self.budget.charge(_COST_OBJ + 2 * n, "pickled strings")
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise self._bad("invalid UTF-8 string") from None

    def _bytes(self, n: int) -> bytes:
        self.budget.charge(_COST_OBJ + 2 * n, "pickled bytes")
        return self._take(n)

    # -- the interpreter

    def load(self) -> Any:
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        budget = self.budget
        data = self.data
        n_data = len(data)

        def pop_mark() -> list[Any]:
            nonlocal stack
            if not marks:
                raise self._bad("no MARK on the stack")
            items = stack
            stack = marks.pop()
            return items

        def pop() -> Any:
            if not stack:
                raise self._bad("stack underflow")
            return stack.pop()

        def top() -> Any:
            if not stack:
                raise self._bad("stack underflow")
            return stack[-1]

        def push(value: Any, cost: int = _COST_OBJ) -> None:
            budget.charge(cost + _COST_ITEM, "pickled objects")
            stack.append(value)

        def set_items(target: Any, items: list[Any]) -> None:
            if not isinstance(target, dict) or len(items) % 2:
                raise self._bad("SETITEM(S) without a dict and key/value pairs")
            budget.charge(_COST_DICT_ITEM * (len(items) // 2), "pickled dict entries")
            for i in range(0, len(items), 2):
                if not _is_key(items[i]):
                    raise self._bad(f"a dict key of type {type(items[i]).__name__}")
                target[items[i]] = items[i + 1]

        def append_items(target: Any, items: list[Any]) -> None:
            if type(target) is not list:
                raise self._bad("APPEND(S) to something that is not a list")
            budget.charge(_COST_ITEM * len(items), "pickled list items")
            target.extend(items)

        while True:
            if self.pos >= n_data:
                raise self._bad("data.pkl ends without STOP")
            op = data[self.pos]
            self.pos += 1
            if op == 0x80:  # PROTO
                proto = self._u(1)
                if proto > 5:
                    raise self._bad(f"pickle protocol {proto}")
            elif op == 0x95:  # FRAME (protocol 4): a length hint, the ops follow inline
                self._take(8)
            elif op == 0x2E:  # STOP
                result = pop()
                return result
            elif op == 0x28:  # MARK
                if len(marks) >= _MAX_MARKS:
                    raise self._bad(f"more than {_MAX_MARKS} nested MARKs")
                budget.charge(_COST_OBJ, "pickle marks")
                marks.append(stack)
                stack = []
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                push(top(), 0)
            elif op == 0x4E:  # NONE
                push(None, 0)
            elif op == 0x88:  # NEWTRUE
                push(True, 0)
            elif op == 0x89:  # NEWFALSE
                push(False, 0)
            elif op == 0x4A:  # BININT
                push(int.from_bytes(self._take(4), "little", signed=True))
            elif op == 0x4B:  # BININT1
                push(self._u(1))
            elif op == 0x4D:  # BININT2
                push(self._u(2))
            elif op in (0x8A, 0x8B):  # LONG1, LONG4
                n = self._u(1) if op == 0x8A else int.from_bytes(self._take(4), "little", signed=True)
                if n < 0 or n > _MAX_LONG:
                    raise self._bad(f"a {n}-byte integer")
                push(int.from_bytes(self._take(n), "little", signed=True), _COST_OBJ + n)
            elif op == 0x47:  # BINFLOAT
                push(struct.unpack(">d", self._take(8))[0])
            elif op == 0x8C:  # SHORT_BINUNICODE
                push(self._str(self._u(1)), 0)
            elif op == 0x58:  # BINUNICODE
                push(self._str(self._u(4)), 0)
            elif op == 0x8D:  # BINUNICODE8
                push(self._str(self._u(8)), 0)
            elif op in (0x55, 0x54):  # SHORT_BINSTRING, BINSTRING (Python 2 str)
                n = self._u(1) if op == 0x55 else int.from_bytes(self._take(4), "little", signed=True)
                raw = self._bytes(n)
                try:
                    push(raw.decode("ascii"), 0)
                except UnicodeDecodeError:
                    raise self._bad("non-ASCII Python 2 string") from None
            elif op == 0x43:  # SHORT_BINBYTES
                push(self._bytes(self._u(1)), 0)
            elif op == 0x42:  # BINBYTES
                push(self._bytes(self._u(4)), 0)
            elif op == 0x8E:  # BINBYTES8
                push(self._bytes(self._u(8)), 0)
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                push(tuple(items), _COST_OBJ + _COST_ITEM * len(items))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1-3
                k = op - 0x84
                if len(stack) < k:
                    raise self._bad("stack underflow")
                items = stack[-k:]
                del stack[-k:]
                push(tuple(items), _COST_OBJ + _COST_ITEM * k)
            elif op == 0x5D:  # EMPTY_LIST
                push([])
            elif op == 0x6C:  # LIST
                items = pop_mark()
                push(items, _COST_OBJ + _COST_ITEM * len(items))
            elif op == 0x61:  # APPEND
                value = pop()
                append_items(top(), [value])
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                append_items(top(), items)
            elif op == 0x7D:  # EMPTY_DICT
                push({})
            elif op == 0x64:  # DICT
                items = pop_mark()
                d: dict = {}
                set_items(d, items)
                push(d)
            elif op == 0x73:  # SETITEM
                value = pop()
                key = pop()
                set_items(top(), [key, value])
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                set_items(top(), items)
            elif op == 0x63:  # GLOBAL
                module = self._line()
                name = self._line()
                push(self._find_global(module, name))
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise self._bad("STACK_GLOBAL without two strings")
                push(self._find_global(module, name))
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                push(self._reduce(func, args))
            elif op == 0x81:  # NEWOBJ
                args = pop()
                cls = pop()
                push(self._new(cls, args, {}))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs = pop()
                args = pop()
                cls = pop()
                push(self._new(cls, args, kwargs))
            elif op == 0x62:  # BUILD
                state = pop()
                self._build(top(), state)
            elif op == 0x51:  # BINPERSID
                pid = pop()
                push(self._persistent(pid), 0)
            elif op in (0x71, 0x72, 0x94):  # BINPUT, LONG_BINPUT, MEMOIZE
                index = self._u(1) if op == 0x71 else self._u(4) if op == 0x72 else len(memo)
                budget.charge(_COST_MEMO, "the pickle memo")
                memo[index] = top()
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                index = self._u(1) if op == 0x68 else self._u(4)
                try:
                    push(memo[index], 0)
                except KeyError:
                    raise self._bad(f"memo entry {index} was never stored") from None
            else:
                name = _OP_NAMES.get(op, f"byte {op:#04x}")
                raise CheckpointError(
                    f"{self.path}: pickle opcode {name} at byte {self.pos - 1} is not one torch.save writes; "
                    "refusing the file (it is damaged, or not a PyTorch checkpoint)"
                )

    # -- the only calls a file can make

    def _find_global(self, module: str, name: str) -> _Global:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: refusing to load global '{module}.{name}'. Checkpoints may only "
                "contain tensors, OrderedDicts and utils.HParams; this file is not a GPT-SoVITS "
                "checkpoint or was written by unknown code. Re-export it or obtain a clean copy."
            ) from None

    def _fresh_object(self, obj: Any) -> Any:
        self._fresh.add(id(obj))
        self._keep.append(obj)
        return obj

    def _reduce(self, func: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise self._bad("REDUCE arguments are not a tuple")
        if func is _ORDERED_DICT:
            if args == ():
                return self._fresh_object(collections.OrderedDict())
            if len(args) == 1 and type(args[0]) is list:
                out = collections.OrderedDict()
                pairs = args[0]
                if not all(type(p) is tuple and len(p) == 2 and _is_key(p[0]) for p in pairs):
                    raise self._bad("OrderedDict() from something other than (key, value) pairs")
                self.budget.charge(_COST_DICT_ITEM * len(pairs), "pickled dict entries")
                out.update(pairs)
                return self._fresh_object(out)
            raise self._bad("OrderedDict() with unexpected arguments")
        if func is _REBUILD_TENSOR:
            if not 4 <= len(args) <= 7:
                raise self._bad(f"_rebuild_tensor_v2 with {len(args)} arguments")
            return self._rebuild_tensor(*args[:4])
        if func is _REBUILD_PARAMETER:
            if not 1 <= len(args) <= 3 or not isinstance(args[0], np.ndarray):
                raise self._bad("_rebuild_parameter without a tensor")
            return args[0]
        raise CheckpointError(f"{self.path}: the pickle calls {short_repr(func)}, which only constructs objects; "
                              "refusing the file (it is damaged, or not a PyTorch checkpoint)")

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if cls is _HPARAMS and args == () and kwargs == {}:
            return self._fresh_object(HParams())
        if cls is _ORDERED_DICT and args == () and kwargs == {}:
            return self._fresh_object(collections.OrderedDict())
        raise CheckpointError(f"{self.path}: the pickle instantiates {short_repr(cls)} with {type(args).__name__} "
                              "arguments; only utils.HParams() is allowed. Refusing the file.")

    def _build(self, inst: Any, state: Any) -> None:
        # only objects this load made; never the tokens of the globals, never a shared object
        if id(inst) not in self._fresh or type(inst) not in (HParams, collections.OrderedDict):
            raise CheckpointError(f"{self.path}: the pickle sets the state of a {type(inst).__name__}, which "
                                  "torch.save never does; refusing the file (it is damaged or hostile)")
        if type(state) is tuple and len(state) == 2 and state[1] is None:
            state = state[0]
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise self._bad(f"BUILD state of type {type(state).__name__}")
        if type(inst) is HParams:
            self.budget.charge(_COST_DICT_ITEM * len(state), "pickled HParams entries")
            inst.update(state)
        # an OrderedDict's state is its attributes (e.g. state_dict()._metadata): not needed, dropped

    def _persistent(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise self._bad(f"unsupported persistent id {short_repr(pid)}")
        _tag, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, _Global) and storage_type.module == "torch"
                and storage_type.name in _STORAGE_DTYPES):
            raise self._bad(f"unsupported storage type {short_repr(storage_type)}")
        if not (type(key) is str and 0 < len(key) <= _MAX_STORAGE_KEY and "/" not in key and "\\" not in key):
            raise self._bad(f"storage key {short_repr(key)}")
        if type(location) is not str or type(numel) is not int or numel < 0:
            raise self._bad(f"storage '{key}' with location {short_repr(location)} and {short_repr(numel)} elements")
        return self.load_storage(storage_type.name, key, numel)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
        """`torch._utils._rebuild_tensor_v2`: a strided view of a storage, validated, then copied."""
        if not isinstance(storage, _Storage):
            raise self._bad("_rebuild_tensor_v2 without a storage")
        if type(size) not in (tuple, list) or type(stride) not in (tuple, list):
            raise self._bad("tensor size/stride are not tuples")
        if not all(type(v) is int for v in (offset, *size, *stride)):
            raise self._bad("tensor offset/size/stride are not integers")
        where = f"tensor on storage '{storage.key}' (offset {offset}, size {tuple(size)}, stride {tuple(stride)})"
        if len(size) != len(stride) or len(size) > MAX_NDIM:
            raise self._bad(f"{where}: {len(size)} sizes, {len(stride)} strides")
        if offset < 0 or any(s < 0 for s in size) or any(st < 0 for st in stride):
            raise self._bad(f"{where}: negative offset, size or stride")
        numel = math.prod(size)
        base = storage.data
        if numel == 0:
            if any(s > _MAX_DIM for s in size) or math.prod(s for s in size if s) >= 2**62 or offset > base.size:
                raise self._bad(f"{where}: empty tensor with an impossible shape")
            arr = np.zeros(size, dtype=base.dtype)
        else:
            if numel > base.size:
                # also refuses zero-stride expansions: they would let a tiny file fill memory
                raise self._bad(f"{where}: {numel} elements from a storage of {base.size}")
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= base.size:
                raise self._bad(f"{where}: reads element {last} of a storage of {base.size}")
            item = base.itemsize
            if (not storage.handed_out and offset == 0 and numel == base.size
                    and _contiguous(tuple(size), tuple(stride))):
                # the usual case, one tensor per storage: the freshly read buffer becomes the tensor
                storage.handed_out = True
                arr = base.reshape(tuple(size))
            else:
                out_item = 4 if storage.type_name == "BFloat16Storage" else item
                self.budget.charge(numel * out_item + _COST_OBJ, f"tensors (now on storage '{storage.key}')")
                # numpy re-checks the extent against the buffer; the copy keeps a 0-d shape as ()
                view = np.ndarray(tuple(size), dtype=base.dtype, buffer=base, offset=offset * item,
                                  strides=tuple(st * item for st in stride))
                arr = view.copy()
        if storage.type_name == "BFloat16Storage":
            wide = arr.astype(np.uint32)
            wide <<= 16
            arr = wide.view(np.float32)
        return arr

    def check_tree(self, root: Any) -> None:
        """Refuse cycles, nesting deeper than MAX_DEPTH and trees that shared references expand past
        MAX_EXPANDED values (printing or walking them naively would never end). One pass, each
        container once."""
        height: dict[int, int] = {}
        expanded: dict[int, int] = {}
        on_path: set[int] = set()
        work: list[tuple[Any, bool]] = [(root, False)]
        while work:
            obj, done = work.pop()
            if not isinstance(obj, (dict, list, tuple)):
                continue
            oid = id(obj)
            if done:
                children = [c for c in (obj.values() if isinstance(obj, dict) else obj)
                            if isinstance(c, (dict, list, tuple))]
                height[oid] = 1 + max((height[id(c)] for c in children), default=0)
                expanded[oid] = 1 + len(obj) + sum(expanded[id(c)] for c in children)
                on_path.discard(oid)
                if height[oid] > MAX_DEPTH:
                    raise CheckpointError(f"{self.path}: the pickled object nests deeper than {MAX_DEPTH} "
                                          "levels; no checkpoint does, the file is damaged or hostile")
                if expanded[oid] > MAX_EXPANDED:
                    raise CheckpointError(f"{self.path}: shared references make the pickled object expand to "
                                          f"more than {MAX_EXPANDED:,} values; the file is damaged or hostile")
                continue
            if oid in height:
                continue
            if oid in on_path:
                raise CheckpointError(f"{self.path}: the pickled object contains itself; checkpoints are trees, "
                                      "the file is damaged or hostile")
            on_path.add(oid)
            work.append((obj, True))
            children = obj.values() if isinstance(obj, dict) else obj
            work.extend((c, False) for c in children if isinstance(c, (dict, list, tuple)))


# ---------------------------------------------------------------------------- torch zip files


@dataclass
class TorchCheckpoint:
    """What a torch zip file holds, with every tensor as a numpy array."""

    path: Path
    obj: Any
    version_tag: str | None = None  # e.g. "v2Pro" for tagged SoVITS files, None for plain zips
    archive_folder: str = ""
    extra: dict = field(default_factory=dict)


def _open_checkpoint(path: Path) -> tuple[BinaryIO, int, str | None]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint file not found; check the model directory") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 4:
            raise CheckpointError(f"{path}: file is empty or truncated ({len(head)} bytes); re-download it")
        if head[:2] == b"PK":
            return fh, size, None
        if head[:2] in VERSION_TAGS and head[2:4] == b"\x03\x04":
            return fh, size, VERSION_TAGS[head[:2]]
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) PyTorch format is not supported; "
                "re-save it with a recent torch (torch.save(torch.load(f), f))"
            )
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (starts with {head!r}); the file is corrupt or of another format"
        )
    except BaseException:
        fh.close()
        raise


def read_torch_file(path: str | Path) -> TorchCheckpoint:
    """Read a PyTorch zip checkpoint without torch.

    Tensors become numpy arrays in their stored dtype (bfloat16 is widened to float32);
    `OrderedDict`s stay `OrderedDict`s; a pickled `utils.HParams` becomes an `HParams` dict.
    Raises `CheckpointError` (naming the file) for anything a `torch.save` file would not hold.
    """
    path = Path(path)
    fh, size, tag = _open_checkpoint(path)
    with fh:
        budget = _Budget(path, size)
        archive = _Archive(path, fh, size, tag is not None, budget)
        names = list(archive.members)
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{path}: expected exactly one data.pkl in the archive, found {len(pkl_names)}; "
                "the file is not a PyTorch checkpoint or is damaged"
            )
        folder = pkl_names[0][: -len("data.pkl")]
        byteorder = f"{folder}byteorder"
        if byteorder in archive.members:
            order = archive.read(byteorder, limit=_MAX_META, what="member").tobytes().strip()
            if order not in (b"little", b""):
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(type_name: str, key: str, numel: int) -> _Storage:
            known = storages.get(key)
            if known is not None:
                if known.type_name != type_name or known.data.size != numel:
                    raise CheckpointError(
                        f"{path}: storage '{key}' is used as {known.type_name}[{known.data.size}] and as "
                        f"{type_name}[{numel}]; the file is damaged"
                    )
                return known
            member = f"{folder}data/{key}"
            if member not in archive.members:
                raise CheckpointError(f"{path}: storage '{member}' is missing; the file is truncated or damaged")
            dtype = _STORAGE_DTYPES[type_name]
            have = archive.members[member].size
            if have != numel * dtype.itemsize:
                raise CheckpointError(
                    f"{path}: storage '{member}' holds {have} bytes, the pickle says {numel} x "
                    f"{dtype.itemsize} bytes ({type_name}); the file is damaged"
                )
            storages[key] = _Storage(key, type_name, archive.read(member, dtype=dtype, what="storage"))
            return storages[key]

        pickled_array = archive.read(pkl_names[0], limit=_MAX_PICKLE, what="pickle")
        budget.charge(pickled_array.size, "a copy of the pickle")
        pickled = pickled_array.tobytes()
        del pickled_array
        unpickler = _SafeUnpickler(pickled, path=path, budget=budget, load_storage=load_storage)
        try:
            obj = unpickler.load()
            unpickler.check_tree(obj)
        except CheckpointError:
            raise
        except (RecursionError, MemoryError) as exc:  # belt and braces: the budget should stop these first
            raise CheckpointError(f"{path}: the pickle is too large or deep to read ({type(exc).__name__})") from None
        except (ValueError, TypeError, OverflowError, struct.error) as exc:
            raise CheckpointError(
                f"{path}: malformed pickle data ({type(exc).__name__}: {exc}); the file is damaged"
            ) from None
    return TorchCheckpoint(path=path, obj=obj, version_tag=tag, archive_folder=folder.rstrip("/"))


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
        for begin, end, key, dtype, shape in plan:  # header order
            np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
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


# ------------------------------------------------------------------------------------- HF folders


def check_state_dict(source: str | Path, weights: Any, *, what: str = "weights") -> dict[str, Any]:
    """`weights` as a plain dict after checking it is a state dict: string keys, array values.

    Arrays are numpy arrays or anything with a `shape` (e.g. MLX arrays of a converted cache).
    """
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{source}: {what} should be a mapping of names to tensors, found "
                              f"{type(weights).__name__}; the file is not a model checkpoint")
    out = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: {what} has a non-string key {short_repr(key)}")
        if not isinstance(getattr(value, "shape", None), tuple):
            raise CheckpointError(f"{source}: {what}[{key[:80]!r}] is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_hf_weights(folder: str | Path) -> dict[str, np.ndarray]:
    """State dict of a Hugging Face model folder: `model.safetensors` if present, else `pytorch_model.bin`.

    Weight-norm tensors are returned under the legacy `weight_g`/`weight_v` names whichever
    naming the file used.
    """
    folder = Path(folder)
    st = folder / "model.safetensors"
    bin_ = folder / "pytorch_model.bin"
    if st.exists():
        if not st.is_file():
            raise CheckpointError(f"{st}: is not a file")
        weights = read_safetensors(st)
        source = st
    elif bin_.exists():
        if not bin_.is_file():
            raise CheckpointError(f"{bin_}: is not a file")
        weights = read_torch_file(bin_).obj
        source = bin_
    else:
        sharded = [p.name for p in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json")
                   if p.exists()]
        hint = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
        raise FileNotFoundError(
            f"{folder}: no model.safetensors or pytorch_model.bin{hint}; "
            "copy the model folder from the PrimeSpeech download into place"
        )
    weights = normalize_weight_norm_names(check_state_dict(source, weights, what="the state dict"))
    check_weight_norm_pairs(source, weights)
    return weights


def check_weight_norm_pairs(source: str | Path, weights: Mapping[str, Any], *, dim: int | None = None) -> None:
    """Every `<name>.weight_v` has its `<name>.weight_g` and the other way round, and g has v's rank
    with every axis 1 except at most one equal to v's (axis `dim` if given): so `fuse_weight_norm`
    broadcasts g over v without growing anything."""
    for key in weights:
        if not key.endswith((".weight_g", ".weight_v")):
            continue
        base = key[:-len("_g")]
        g, v = weights.get(base + "_g"), weights.get(base + "_v")
        if g is None or v is None:
            raise CheckpointError(f"{source}: {base} has only one of weight_g/weight_v; the file is damaged")
        if key.endswith("_g"):
            continue
        g_shape, v_shape = tuple(g.shape), tuple(v.shape)
        ok = (len(g_shape) == len(v_shape) >= 1
              and all(gs in (1, vs) for gs, vs in zip(g_shape, v_shape))
              and sum(gs != 1 for gs in g_shape) <= 1
              and (dim is None or all(gs == 1 for i, gs in enumerate(g_shape) if i != dim % len(v_shape))))
        if not ok:
            raise CheckpointError(f"{source}: {base}.weight_g has shape {g_shape}, which does not fit weight_v "
                                  f"{v_shape} (one norm per {'slice' if dim is None else f'index of axis {dim}'}); "
                                  "the file is damaged")


_PARAMETRIZED = {
    ".parametrizations.weight.original0": ".weight_g",
    ".parametrizations.weight.original1": ".weight_v",
}


def normalize_weight_norm_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map `parametrizations.weight.original0/1` (torch >= 2.1 API) to `weight_g`/`weight_v`."""
    out = {}
    for key, value in weights.items():
        for new_suffix, old_suffix in _PARAMETRIZED.items():
            if key.endswith(new_suffix):
                key = key[: -len(new_suffix)] + old_suffix
                break
        out[key] = value
    return out


def fuse_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray, dim: int = 0) -> np.ndarray:
    """`w = g * v / ||v||` with the norm over every axis except `dim` (torch `weight_norm` semantics).

    `dim=0` is torch's default (per output channel of Conv1d, per input channel of ConvTranspose1d);
    HuBERT's positional convolution uses `dim=2`. Computed in float32; no epsilon, as torch.
    """
    v = weight_v.astype(np.float32)
    g = weight_g.astype(np.float32)
    axes = tuple(a for a in range(v.ndim) if a != dim % v.ndim)
    norm = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
    return (g * v / norm).astype(np.float32)


# ----------------------------------------------------------------------------------------- configs

def to_plain(obj: Any, *, source: str | Path = "config", max_depth: int = MAX_DEPTH) -> Any:
    """Convert HParams/OrderedDict nests into plain dicts and lists (for configs).

    Each container is converted once (a memo keyed by identity), so a config whose lists are shared
    many times over (pickle memo references) costs its size, not the number of paths through it;
    a shared sub-tree stays shared in the result. Nesting deeper than `max_depth` (which includes
    any cycle), or sharing that would expand the result past `MAX_EXPANDED` values when printed or
    copied, raises `CheckpointError` naming `source`.
    """
    done: dict[int, tuple[Any, int, int]] = {}  # id -> (plain value, height, expanded size)

    def walk(value: Any, depth: int) -> tuple[Any, int, int]:
        if not isinstance(value, (dict, list, tuple)):
            return value, 0, 1
        hit = done.get(id(value))
        if hit is None:
            if depth >= max_depth:
                raise CheckpointError(f"{source}: nests deeper than {max_depth} levels (or contains itself); "
                                      "a model config never does, the file is damaged or hostile")
            if isinstance(value, dict):
                pairs = [(k, walk(v, depth + 1)) for k, v in value.items()]
                out: Any = {k: v for k, (v, _h, _n) in pairs}
                subs = [r for _k, r in pairs]
            else:
                subs = [walk(v, depth + 1) for v in value]
                out = [v for v, _h, _n in subs]
            hit = (out, 1 + max((h for _v, h, _n in subs), default=0), 1 + sum(n for _v, _h, n in subs))
            if hit[2] > MAX_EXPANDED:
                raise CheckpointError(f"{source}: shared references make it expand to more than {MAX_EXPANDED:,} "
                                      "values; a model config never does, the file is damaged or hostile")
            done[id(value)] = hit
        if depth + hit[1] > max_depth:
            raise CheckpointError(f"{source}: nests deeper than {max_depth} levels; a model config never does, "
                                  "the file is damaged or hostile")
        return hit

    return walk(obj, 0)[0]


def check_int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    """`value` if it is an int (not a bool) in [lo, hi], else ValueError naming `where.name`."""
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{where}: {name}={short_repr(value)} must be an integer in [{lo}, {hi}]")
    return value


def check_float(where: str, name: str, value: Any, lo: float, hi: float, *, open_low: bool = False) -> float:
    """`value` if it is a finite number (int or float, not a bool) in [lo, hi] (or (lo, hi])."""
    ok = type(value) in (int, float) and math.isfinite(value) and (lo < value if open_low else lo <= value) \
        and value <= hi
    if not ok:
        raise ValueError(f"{where}: {name}={short_repr(value)} must be a number in {'(' if open_low else '['}{lo}, {hi}]")
    return value


def check_int_list(where: str, name: str, value: Any, lo: int, hi: int, *, min_len: int = 1,
                   max_len: int = 64) -> list[int]:
    """`value` if it is a list/tuple of min_len..max_len ints in [lo, hi]."""
    if not (isinstance(value, (list, tuple)) and min_len <= len(value) <= max_len
            and all(type(v) is int and lo <= v <= hi for v in value)):
        raise ValueError(f"{where}: {name}={short_repr(value)} must be a list of {min_len}-{max_len} integers "
                         f"in [{lo}, {hi}]")
    return list(value)


_MAX_JSON_CONFIG = 1024 * 1024  # an HF config.json is ~1-2 KB


def read_json_config(path: str | Path) -> dict[str, Any]:
    """An HF `config.json` as a dict: size-capped, valid JSON, an object, nesting at most MAX_DEPTH."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_JSON_CONFIG + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the HF model folder needs its config.json") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > _MAX_JSON_CONFIG:
        raise CheckpointError(f"{path}: larger than {_MAX_JSON_CONFIG:,} bytes; not an HF config.json")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}); restore the original config.json") \
            from None
    return plain_config(value, path)


def plain_config(config: Any, source: str | Path) -> dict[str, Any]:
    """A checkpoint's `config` as plain nested dicts/lists; anything but a mapping is refused."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the config is a {type(config).__name__}, not a mapping; "
                              "the file is not a GPT-SoVITS checkpoint or is damaged")
    return to_plain(config, source=source)
