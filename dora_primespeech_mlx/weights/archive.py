"""The zip container of a torch file, parsed by hand: every member validated against the file
(offsets, sizes, flags, no compression) before a byte of it is read, and CRC-checked."""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .common import _ALLOWED_ZIP_FLAGS, _COST_ZIP_ENTRY, CheckpointError, _Budget

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


