"""Tools to take torch checkpoints apart and put them back together with chosen damage.

Used by the hostile-file tests (tests/test_checkpoint.py) and the fuzz campaign
(benchmarks/fuzz_checkpoints.py). Nothing here imports torch: files start from
`weights.writer`, and edits happen at three levels:

- pickle: `disassemble` lists the opcodes of `data.pkl` as `Op(name, arg)`, `assemble` writes a list
  back (arguments re-encoded, so an edited int may change opcode); `Op("RAW", b"...")` inserts
  bytes verbatim;
- tensors: `tensor_sites` finds, for each `_rebuild_tensor_v2` call, the ops holding the storage's
  element count, the offset, the sizes and the strides;
- zip: `members` / `build_zip` read and write the members (stored or deflated, CRCs right), and
  `zip_layout` gives the byte offsets of every header field for raw patches.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

_BY_NAME = {op.name: op for op in pickletools.opcodes}


@dataclass
class Op:
    name: str  # pickletools opcode name, or "RAW" (arg: bytes written as they are)
    arg: Any = None


def disassemble(data: bytes) -> list[Op]:
    """The opcodes of a pickle (stops at STOP, as pickletools does)."""
    return [Op(op.name, arg) for op, arg, _pos in pickletools.genops(data)]


def int_op(value: int) -> Op:
    """The opcode the pickler would use for `value`."""
    if 0 <= value < 0x100:
        return Op("BININT1", value)
    if 0 <= value < 0x10000:
        return Op("BININT2", value)
    if -(2**31) <= value < 2**31:
        return Op("BININT", value)
    return Op("LONG1" if abs(value) < 2 ** 2000 else "LONG4", value)


def _long_bytes(value: int) -> bytes:
    if value == 0:
        return b""
    return value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)


def _encode_arg(name: str, kind: str, arg: Any) -> bytes:
    if kind == "uint1":
        return bytes([arg & 0xFF])
    if kind == "uint2":
        return struct.pack("<H", arg & 0xFFFF)
    if kind == "int4":
        return struct.pack("<i", arg)
    if kind == "uint4":
        return struct.pack("<I", arg & 0xFFFFFFFF)
    if kind == "uint8":
        return struct.pack("<Q", arg & 0xFFFFFFFFFFFFFFFF)
    if kind == "long1":
        raw = _long_bytes(arg)
        return bytes([len(raw)]) + raw
    if kind == "long4":
        raw = _long_bytes(arg)
        return struct.pack("<i", len(raw)) + raw
    if kind == "float8":
        return struct.pack(">d", arg)
    if kind in ("unicodestring1", "unicodestring4", "unicodestring8"):
        raw = arg.encode("utf-8", "surrogatepass")
        n = {"unicodestring1": "<B", "unicodestring4": "<I", "unicodestring8": "<Q"}[kind]
        return struct.pack(n, len(raw)) + raw
    if kind in ("bytes1", "bytes4", "bytes8"):
        n = {"bytes1": "<B", "bytes4": "<I", "bytes8": "<Q"}[kind]
        return struct.pack(n, len(arg)) + bytes(arg)
    if kind in ("string1", "string4"):
        raw = arg.encode("latin-1") if isinstance(arg, str) else bytes(arg)
        return (struct.pack("<B", len(raw)) if kind == "string1" else struct.pack("<i", len(raw))) + raw
    if kind == "stringnl_noescape_pair":
        module, _, attr = str(arg).partition(" ")
        return f"{module}\n{attr}\n".encode("utf-8")
    if kind in ("decimalnl_short", "decimalnl_long", "floatnl", "stringnl", "stringnl_noescape",
                "unicodestringnl"):
        return f"{arg}\n".encode("utf-8", "surrogatepass")
    raise ValueError(f"cannot encode {name} argument of kind {kind}")


def assemble(ops: list[Op]) -> bytes:
    out = []
    for op in ops:
        if op.name == "RAW":
            out.append(bytes(op.arg))
            continue
        if op.name in ("BININT1", "BININT2", "BININT", "LONG1", "LONG4") and op.arg is not None:
            # keep the value, pick an opcode that can hold it
            fixed = int_op(int(op.arg)) if not _fits(op.name, int(op.arg)) else op
            op = fixed
        code = _BY_NAME[op.name]
        out.append(code.code.encode("latin-1"))
        if code.arg is not None:
            out.append(_encode_arg(op.name, code.arg.name, op.arg))
    return b"".join(out)


def _fits(name: str, value: int) -> bool:
    return {"BININT1": 0 <= value < 0x100, "BININT2": 0 <= value < 0x10000,
            "BININT": -(2**31) <= value < 2**31, "LONG1": len(_long_bytes(value)) < 256,
            "LONG4": True}[name]


@dataclass
class TensorSite:
    persid: int  # index of BINPERSID
    numel: int  # index of the op holding the storage's element count
    storage_type: int  # index of the GLOBAL/BINGET naming the storage class
    offset: int  # index of the storage offset op
    size: list[int]  # indices of the size ints
    stride: list[int]  # indices of the stride ints


_INTS = {"BININT1", "BININT2", "BININT", "LONG1", "LONG4"}


def tensor_sites(ops: list[Op]) -> list[TensorSite]:
    """Where each tensor's numbers are, for pickles laid out as torch.save / weights.writer writes them."""
    sites = []
    for i, op in enumerate(ops):
        if op.name != "BINPERSID":
            continue
        # ... MARK "storage" <type> <key> "cpu" <numel> TUPLE BINPERSID
        j = i - 1
        while j >= 0 and ops[j].name != "TUPLE":
            j -= 1
        numel = j - 1
        if numel < 0 or ops[numel].name not in _INTS:
            continue
        mark = j
        while mark >= 0 and ops[mark].name != "MARK":
            mark -= 1
        value_ops = [k for k in range(mark + 1, j) if ops[k].name not in ("BINPUT", "LONG_BINPUT", "MEMOIZE")]
        storage_type = value_ops[1] if len(value_ops) > 1 else numel
        # BINPERSID [BINPUT] <offset> [MARK] sizes TUPLEn [MARK] strides TUPLEn NEWFALSE
        k = i + 1
        groups: list[list[int]] = []
        offset = None
        current: list[int] = []
        while k < len(ops) and ops[k].name not in ("NEWFALSE", "NEWTRUE", "REDUCE"):
            name = ops[k].name
            if name in _INTS:
                if offset is None:
                    offset = k
                else:
                    current.append(k)
            elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE") and offset is not None:
                groups.append(current)
                current = []
            k += 1
        if offset is None or len(groups) < 2:
            continue
        sites.append(TensorSite(i, numel, storage_type, offset, groups[0], groups[1]))
    return sites


# -------------------------------------------------------------------------------------------- zip


def members(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def build_zip(items: list[tuple[str, bytes]], *, deflate: frozenset[str] | set[str] = frozenset(),
              tag: bytes | None = None) -> bytes:
    """A zip of `items` in order, stored, or deflated for the names in `deflate`; `tag` overwrites `PK`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            zf.writestr(info, data)
    raw = buf.getvalue()
    if tag is not None:
        raw = tag + raw[2:]
    return raw


def compressed(raw: bytes) -> set[str]:
    """Names of the members that are not stored (so a rebuilt zip keeps them compressed)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {info.filename for info in zf.infolist() if info.compress_type != zipfile.ZIP_STORED}


def replace_member(raw: bytes, name: str, data: bytes) -> bytes:
    return build_zip([(n, data if n == name else d) for n, d in members(raw)], deflate=compressed(raw))


def pickle_name(raw: bytes) -> str:
    return next(n for n, _d in members(raw) if n.endswith("data.pkl"))


def with_pickle(raw: bytes, pkl: bytes) -> bytes:
    return replace_member(raw, pickle_name(raw), pkl)


def get_pickle(raw: bytes) -> bytes:
    return dict(members(raw))[pickle_name(raw)]


@dataclass
class ZipLayout:
    """Byte offsets of the headers in a zip: where to patch raw fields."""

    local: dict[str, int]  # member -> offset of its local header
    central: dict[str, int]  # member -> offset of its central directory entry
    eocd: int  # offset of the end-of-central-directory record


def zip_layout(raw: bytes) -> ZipLayout:
    eocd = raw.rfind(b"PK\x05\x06")
    n, cd_size, cd_offset = struct.unpack("<HLL", raw[eocd + 10:eocd + 20])
    local, central = {}, {}
    pos = cd_offset
    for _ in range(n):
        n_name, n_extra, n_comment = struct.unpack("<3H", raw[pos + 28:pos + 34])
        name = raw[pos + 46:pos + 46 + n_name].decode("utf-8", "replace")
        central[name] = pos
        local[name] = struct.unpack("<L", raw[pos + 42:pos + 46])[0]
        pos += 46 + n_name + n_extra + n_comment
    return ZipLayout(local, central, eocd)


def patch(raw: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)
