"""Torch-free writers of the checkpoint formats that the readers of this package read.

`write_torch_file` writes what `torch.save` writes (zip format, pickle protocol 2): a zip whose
`<folder>/data.pkl` pickle names `torch._utils._rebuild_tensor_v2` and `torch.<T>Storage` and
points, through persistent ids, at raw little-endian storages `<folder>/data/<key>`. Members are
stored uncompressed and their data starts on a 64-byte boundary (the zip extra field pads the
local header), as torch >= 2.0 does, so `torch.load(..., mmap=True)` can map them in place. The
pickle is written opcode by opcode: torch is never imported, and nothing here needs it installed.

Values that can be written: numpy arrays (tensors; dtypes float16/32/64, int8/16/32/64, uint8,
bool), `dict`, `collections.OrderedDict`, `checkpoint.HParams` (pickled as GPT-SoVITS's
`utils.HParams`), `list`, `tuple`, `str`, `int`, `float`, `bool` and `None`. Numpy scalars are
written as Python numbers. Arrays that are views of one numpy array share one storage, as tensor
views do in torch.

`write_hf_folder` and `write_wordpiece_tokenizer` lay out a Hugging Face model folder
(`config.json`, `pytorch_model.bin`, `tokenizer.json` + `vocab.txt`) as the encoder loaders read it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .common import VERSION_TAGS, HParams

__all__ = [
    "STORAGE_ALIGNMENT",
    "torch_file_bytes",
    "wordpiece_tokenizer_json",
    "write_hf_folder",
    "write_torch_file",
    "write_wordpiece_tokenizer",
]

STORAGE_ALIGNMENT = 64  # torch's kDataAlignment: every member's data starts on this boundary
_FORMAT_VERSION = b"1"  # `.format_version` of torch >= 2.1 archives
_ARCHIVE_VERSION = b"3\n"  # `version`: the record format torch has written since 1.6
_DOS_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same input, same bytes

# numpy dtype -> torch storage class (inverse of checkpoint._STORAGE_DTYPES, bfloat16 aside)
_STORAGE_NAMES = {
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("<i2"): "ShortStorage",
    np.dtype("i1"): "CharStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
}

# version name -> the 2-byte tag upstream writes over b"PK" (v3 LoRA files use b"03")
_TAG_BYTES = {name: tag for tag, name in VERSION_TAGS.items()}


# ------------------------------------------------------------------------------------- pickling

# protocol-2 opcodes (the subset torch.save emits; torch's weights_only unpickler accepts all of them)
_PROTO, _STOP, _MARK = b"\x80", b".", b"("
_NONE, _TRUE, _FALSE = b"N", b"\x88", b"\x89"
_BININT1, _BININT2, _BININT, _LONG1, _LONG4 = b"K", b"M", b"J", b"\x8a", b"\x8b"
_BINFLOAT, _BINUNICODE, _GLOBAL = b"G", b"X", b"c"
_EMPTY_TUPLE, _TUPLE, _TUPLE1, _TUPLE2, _TUPLE3 = b")", b"t", b"\x85", b"\x86", b"\x87"
_EMPTY_LIST, _APPEND, _APPENDS = b"]", b"a", b"e"
_EMPTY_DICT, _SETITEM, _SETITEMS = b"}", b"s", b"u"
_REDUCE, _NEWOBJ, _BUILD, _BINPERSID = b"R", b"\x81", b"b", b"Q"
_BINPUT, _LONG_BINPUT, _BINGET, _LONG_BINGET = b"q", b"r", b"h", b"j"
_BATCH = 1000  # items per APPENDS/SETITEMS, as pickle batches them


@dataclass
class _StorageEntry:
    key: str
    type_name: str
    data: np.ndarray  # 1-D, little-endian, contiguous: written byte for byte


def _storage_name(dtype: np.dtype, where: str) -> str:
    name = _STORAGE_NAMES.get(dtype.newbyteorder("<"))
    if name is None:
        raise TypeError(f"{where}: numpy dtype {dtype} has no torch storage type; "
                        f"use one of {', '.join(str(d) for d in _STORAGE_NAMES)}")
    return name


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements, as torch gives a contiguous tensor (empty dims count as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _PickleWriter:
    """Emits the protocol-2 pickle of one object; tensors become persistent storage references."""

    def __init__(self) -> None:
        self._out: list[bytes] = [_PROTO + b"\x02"]
        self._memo: dict[tuple[str, Any], int] = {}
        self._roots: dict[int, tuple[np.ndarray, _StorageEntry]] = {}  # id(root array) -> entry
        self._active: set[int] = set()  # containers being written (cycle check)
        self.storages: list[_StorageEntry] = []

    def dumps(self, obj: Any) -> bytes:
        self._save(obj, "obj")
        self._out.append(_STOP)
        return b"".join(self._out)

    # -- memo: globals and strings are written once, then fetched

    def _put(self, key: tuple[str, Any]) -> None:
        idx = len(self._memo)
        self._memo[key] = idx
        self._out.append(_BINPUT + bytes([idx]) if idx < 256 else _LONG_BINPUT + struct.pack("<I", idx))

    def _get(self, key: tuple[str, Any]) -> bool:
        idx = self._memo.get(key)
        if idx is None:
            return False
        self._out.append(_BINGET + bytes([idx]) if idx < 256 else _LONG_BINGET + struct.pack("<I", idx))
        return True

    def _global(self, module: str, name: str) -> None:
        key = ("global", f"{module}\n{name}")
        if not self._get(key):
            self._out.append(_GLOBAL + f"{module}\n{name}\n".encode("ascii"))
            self._put(key)

    # -- values

    def _save(self, obj: Any, where: str) -> None:
        if isinstance(obj, np.generic):  # numpy scalar in a config: a plain number
            obj = obj.item()
        if obj is None:
            self._out.append(_NONE)
        elif obj is True or obj is False:
            self._out.append(_TRUE if obj else _FALSE)
        elif isinstance(obj, int):
            self._int(int(obj))
        elif isinstance(obj, float):
            self._out.append(_BINFLOAT + struct.pack(">d", obj))
        elif isinstance(obj, str):
            self._str(str(obj))
        elif isinstance(obj, np.ndarray):
            self._tensor(obj, where)
        elif isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._active:
                raise ValueError(f"{where}: the object contains itself; checkpoints must be trees")
            self._active.add(id(obj))
            try:
                self._container(obj, where)
            finally:
                self._active.discard(id(obj))
        else:
            raise TypeError(f"{where}: cannot write a {type(obj).__name__} into a checkpoint; use numpy "
                            "arrays, dicts, lists, tuples, str, int, float, bool or None")

    def _int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self._out.append(_BININT1 + bytes([value]))
        elif 0 <= value < 0x10000:
            self._out.append(_BININT2 + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self._out.append(_BININT + struct.pack("<i", value))
        else:  # two's complement, little-endian, always long enough for the sign bit
            raw = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
            head = _LONG1 + bytes([len(raw)]) if len(raw) < 256 else _LONG4 + struct.pack("<i", len(raw))
            self._out.append(head + raw)

    def _str(self, value: str) -> None:
        key = ("str", value)
        if not self._get(key):
            raw = value.encode("utf-8", "surrogatepass")
            self._out.append(_BINUNICODE + struct.pack("<I", len(raw)) + raw)
            self._put(key)

    def _container(self, obj: dict | list | tuple, where: str) -> None:
        if isinstance(obj, tuple):
            if len(obj) > 3:
                self._out.append(_MARK)
            for i, item in enumerate(obj):
                self._save(item, f"{where}[{i}]")
            self._out.append((_EMPTY_TUPLE, _TUPLE1, _TUPLE2, _TUPLE3)[len(obj)] if len(obj) <= 3 else _TUPLE)
        elif isinstance(obj, list):
            self._out.append(_EMPTY_LIST)
            self._batched([(f"{where}[{i}]", (item,)) for i, item in enumerate(obj)], _APPEND, _APPENDS)
        elif isinstance(obj, HParams):
            # GPT-SoVITS utils.HParams: object.__reduce_ex__(2) = NEWOBJ of the class, then BUILD(__dict__)
            self._global("utils", "HParams")
            self._out.append(_EMPTY_TUPLE + _NEWOBJ)
            self._dict_items(dict(obj), where)
            self._out.append(_BUILD)
        elif isinstance(obj, collections.OrderedDict):
            self._global("collections", "OrderedDict")
            self._out.append(_EMPTY_TUPLE + _REDUCE)
            self._setitems(obj, where)
        else:
            self._dict_items(obj, where)

    def _dict_items(self, obj: dict, where: str) -> None:
        self._out.append(_EMPTY_DICT)
        self._setitems(obj, where)

    def _setitems(self, obj: Mapping, where: str) -> None:
        self._batched([(f"{where}[{key!r}]", (key, value)) for key, value in obj.items()], _SETITEM, _SETITEMS)

    def _batched(self, items: list[tuple[str, tuple]], one: bytes, many: bytes) -> None:
        for start in range(0, len(items), _BATCH):
            batch = items[start:start + _BATCH]
            if len(batch) > 1:
                self._out.append(_MARK)
            for item_where, values in batch:
                for value in values:
                    self._save(value, item_where)
            self._out.append(many if len(batch) > 1 else one)

    # -- tensors

    def _tensor(self, arr: np.ndarray, where: str) -> None:
        entry, offset, stride = self._layout(arr, where)
        # _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self._out.append(_MARK + _MARK)
        self._str("storage")
        self._global("torch", entry.type_name)
        self._str(entry.key)
        self._str("cpu")
        self._int(int(entry.data.size))
        self._out.append(_TUPLE + _BINPERSID)
        self._int(offset)
        self._save(tuple(int(s) for s in arr.shape), where)
        self._save(stride, where)
        self._out.append(_FALSE)
        self._global("collections", "OrderedDict")
        self._out.append(_EMPTY_TUPLE + _REDUCE + _TUPLE + _REDUCE)

    def _new_storage(self, type_name: str, data: np.ndarray) -> _StorageEntry:
        entry = _StorageEntry(str(len(self.storages)), type_name, data)
        self.storages.append(entry)
        return entry

    def _layout(self, arr: np.ndarray, where: str) -> tuple[_StorageEntry, int, tuple[int, ...]]:
        """(storage, element offset, element strides) of `arr`; views of one array share its storage."""
        type_name = _storage_name(arr.dtype, where)
        if arr.dtype != arr.dtype.newbyteorder("<"):  # big-endian input: torch storages are little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        item = arr.itemsize
        shareable = (
            arr.size > 0 and root.dtype == arr.dtype and (root.flags.c_contiguous or root.flags.f_contiguous)
            and all(s >= 0 and s % item == 0 for s in arr.strides)
        )
        if shareable:
            byte_offset = arr.__array_interface__["data"][0] - root.__array_interface__["data"][0]
            shareable = byte_offset >= 0 and byte_offset % item == 0
        if not shareable:
            data = np.ascontiguousarray(arr)
            return self._new_storage(type_name, data.reshape(-1)), 0, _contiguous_strides(arr.shape)
        known = self._roots.get(id(root))
        if known is None:
            known = (root, self._new_storage(type_name, root.ravel(order="K")))
            self._roots[id(root)] = known  # the root stays referenced, so its id cannot be reused
        return known[1], byte_offset // item, tuple(s // item for s in arr.strides)


# ---------------------------------------------------------------------------------------- zip


def _padding_extra(offset: int, name: bytes) -> bytes:
    """Zip extra field (id "FB", filled with "Z", as torch pads) that puts the data on a 64-byte boundary."""
    pad = -(offset + 30 + len(name)) % STORAGE_ALIGNMENT
    if pad == 0:
        return b""
    if pad < 4:  # an extra field needs at least its 4-byte header
        pad += STORAGE_ALIGNMENT
    return b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4)


def _write_member(zf: zipfile.ZipFile, fh: BinaryIO, base: int, name: str, payload: bytes | memoryview) -> None:
    info = zipfile.ZipInfo(name, date_time=_DOS_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 0
    info.external_attr = 0
    raw_name = name.encode("utf-8")
    offset = fh.tell() - base
    if len(payload) * 1.05 > zipfile.ZIP64_LIMIT:  # zipfile then adds a 20-byte zip64 field to the header
        offset += 20
    info.extra = _padding_extra(offset, raw_name)
    zf.writestr(info, payload)
    # the padding belongs to the local header only; the central directory lists no extra (as torch's)
    info.extra = b""


def _serialization_id(pickled: bytes, storages: Sequence[_StorageEntry]) -> bytes:
    """A 40-digit id like torch's `.data/serialization_id`, derived from the content (reproducible)."""
    h = hashlib.sha256(pickled)
    for entry in storages:
        h.update(f"{entry.key}:{entry.type_name}:{entry.data.size};".encode())
    return str(int.from_bytes(h.digest()[:17], "big") % 10**40).zfill(40).encode()


def _write_archive(fh: BinaryIO, obj: Any, archive_name: str) -> None:
    if not archive_name or "/" in archive_name or "\\" in archive_name:
        raise ValueError(f"archive_name {archive_name!r} must be a non-empty name without slashes")
    writer = _PickleWriter()
    pickled = writer.dumps(obj)
    base = fh.tell()
    prefix = f"{archive_name}/"
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        # member order as torch 2.x writes it
        _write_member(zf, fh, base, prefix + "data.pkl", pickled)
        _write_member(zf, fh, base, prefix + ".format_version", _FORMAT_VERSION)
        _write_member(zf, fh, base, prefix + ".storage_alignment", str(STORAGE_ALIGNMENT).encode())
        _write_member(zf, fh, base, prefix + "byteorder", b"little")
        for entry in writer.storages:
            data = np.ascontiguousarray(entry.data)
            _write_member(zf, fh, base, f"{prefix}data/{entry.key}", memoryview(data.reshape(-1)).cast("B"))
        _write_member(zf, fh, base, prefix + "version", _ARCHIVE_VERSION)
        _write_member(zf, fh, base, prefix + ".data/serialization_id", _serialization_id(pickled, writer.storages))


def torch_file_bytes(obj: Any, *, archive_name: str = "archive") -> bytes:
    """The bytes `torch.save(obj, io.BytesIO())` would produce for `obj` (numpy arrays as tensors)."""
    buf = io.BytesIO()
    _write_archive(buf, obj, archive_name)
    return buf.getvalue()


def write_torch_file(path: str | os.PathLike, obj: Any, *, archive_name: str | None = None,
                     version_tag: str | None = None) -> Path:
    """Write `obj` as `torch.save(obj, path)` would; numpy arrays become tensors. Returns the path.

    `archive_name` is the folder inside the zip (torch uses the file's stem; upstream GPT-SoVITS
    files carry the stem of their temporary `<time>.pth`). `version_tag` (e.g. "v2Pro") overwrites
    the leading `PK` with upstream's 2-byte version tag; v1/v2 files have none. The file is written
    under a temporary name and renamed into place, so readers never see a partial file.
    """
    path = Path(path)
    tag = None
    if version_tag is not None:
        try:
            tag = _TAG_BYTES[version_tag]
        except KeyError:
            raise ValueError(f"version_tag {version_tag!r} is not one of {', '.join(_TAG_BYTES)}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            _write_archive(fh, obj, archive_name or path.stem or "archive")
            if tag is not None:
                fh.seek(0)
                fh.write(tag)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------- HF folders


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_hf_folder(folder: str | os.PathLike, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                    *, extra_files: Mapping[str, str | Mapping] | None = None) -> Path:
    """A Hugging Face model folder as transformers 4.x saved it: `config.json` plus `pytorch_model.bin`.

    `state_dict` keys are written in their order (an `OrderedDict`, as `Module.state_dict()`).
    `extra_files` maps file names to text or to JSON-able mappings (e.g. `preprocessor_config.json`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / "config.json", json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    for name, content in (extra_files or {}).items():
        text = content if isinstance(content, str) else json.dumps(dict(content), indent=2, sort_keys=True) + "\n"
        _write_text(folder / name, text)
    write_torch_file(folder / "pytorch_model.bin", collections.OrderedDict(state_dict))
    return folder


_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_tokenizer_json(vocab: Sequence[str], *, lowercase: bool = True) -> dict:
    """The `tokenizers` JSON of a BERT WordPiece tokenizer over `vocab` (ids = positions).

    Same pipeline as BERT-Chinese tokenizers: BertNormalizer (Chinese characters split apart),
    BertPreTokenizer, WordPiece with `##` continuations, `[CLS] ... [SEP]` around each sequence.
    """
    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise ValueError("the vocabulary has duplicate tokens; each token needs one id")
    missing = [t for t in _SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"the vocabulary lacks the special tokens {missing}")
    cls_, sep = ids["[CLS]"], ids["[SEP]"]

    def special(token: str, type_id: int) -> dict:
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    def sequence(name: str, type_id: int) -> dict:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t in sorted(_SPECIAL_TOKENS, key=ids.get)
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0), sequence("B", 1),
                     special("[SEP]", 1)],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [cls_], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids},
    }


def write_wordpiece_tokenizer(folder: str | os.PathLike, vocab: Sequence[str], *, lowercase: bool = True) -> None:
    """Write `tokenizer.json` and `vocab.txt` of a BERT WordPiece tokenizer (what models/bert.py and
    text/g2pw.py load); `vocab` must hold `[PAD] [UNK] [CLS] [SEP] [MASK]`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = wordpiece_tokenizer_json(vocab, lowercase=lowercase)
    if any("\n" in token for token in vocab):
        raise ValueError("vocabulary tokens cannot contain newlines (vocab.txt has one token per line)")
    _write_text(folder / "tokenizer.json", json.dumps(spec, ensure_ascii=False, indent=2) + "\n")
    _write_text(folder / "vocab.txt", "".join(f"{token}\n" for token in vocab))
