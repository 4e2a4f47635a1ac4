"""Torch-free readers for the checkpoint files users already have.

GPT-SoVITS weights come as PyTorch pickles inside a zip (`.ckpt`, `.pth`, HF `pytorch_model.bin`) and
sometimes as HF `model.safetensors`. Reading them needs no torch: the zip holds one pickle
(`<folder>/data.pkl`) whose tensors point at raw storages (`<folder>/data/<key>`). The unpickler
below only resolves the handful of globals these files use, so a hostile file can never run code.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "HParams",
    "TorchCheckpoint",
    "read_torch_file",
    "read_safetensors",
    "load_hf_weights",
    "normalize_weight_norm_names",
    "fuse_weight_norm",
]


class CheckpointError(ValueError):
    """A checkpoint file could not be read; the message names the file and what to do."""


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


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    data: np.ndarray  # 1-D, in the storage's own dtype
    is_bf16: bool = False


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> np.ndarray:
    """Equivalent of `torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    base = storage.data
    n_needed = offset + (1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0)
    if n_needed > base.size:
        raise _CorruptStorage(f"tensor of shape {size} needs {n_needed} elements, storage has {base.size}")
    if not all(size):
        arr = np.zeros(size, dtype=base.dtype)
    else:
        item = base.itemsize
        arr = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
        )
        arr = np.ascontiguousarray(arr)
    if storage.is_bf16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _rebuild_parameter(data, _requires_grad, _hooks, *_ignored):
    return data


class _CorruptStorage(Exception):
    pass


# The only globals a GPT-SoVITS checkpoint may name. Anything else is refused before it is resolved.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("utils", "HParams"): HParams,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, path: Path, load_storage):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refusing to load global '{module}.{name}'. Checkpoints may only "
                "contain tensors, OrderedDicts and utils.HParams; this file is not a GPT-SoVITS "
                "checkpoint or was written by unknown code. Re-export it or obtain a clean copy."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r} in pickle")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: unsupported storage type {storage_type!r}")
        return self._load_storage(storage_type, str(key), int(numel))


@dataclass
class TorchCheckpoint:
    """What a torch zip file holds, with every tensor as a numpy array."""

    path: Path
    obj: Any
    version_tag: str | None = None  # e.g. "v2Pro" for tagged SoVITS files, None for plain zips
    archive_folder: str = ""
    extra: dict = field(default_factory=dict)


def _open_zip(path: Path) -> tuple[zipfile.ZipFile, str | None]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint file not found; check the model directory") from None
    if len(head) < 4:
        raise CheckpointError(f"{path}: file is empty or truncated ({len(head)} bytes); re-download it")
    tag = None
    try:
        if head[:2] == b"PK":
            return zipfile.ZipFile(path), None
        if head[:2] not in VERSION_TAGS:
            if head[:1] == b"\x80":
                raise CheckpointError(
                    f"{path}: legacy (pre-1.6, non-zip) PyTorch format is not supported; "
                    "re-save it with a recent torch (torch.save(torch.load(f), f))"
                )
            raise CheckpointError(
                f"{path}: not a PyTorch zip checkpoint (starts with {head!r}); "
                "the file is corrupt or of another format"
            )
        # tagged file: restore the zip magic in memory
        tag = VERSION_TAGS[head[:2]]
        return zipfile.ZipFile(io.BytesIO(b"PK" + path.read_bytes()[2:])), tag
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: damaged zip archive ({exc}); the file is truncated or corrupt, re-download it"
        ) from None


def read_torch_file(path: str | Path) -> TorchCheckpoint:
    """Read a PyTorch zip checkpoint without torch.

    Tensors become numpy arrays in their stored dtype (bfloat16 is widened to float32);
    `OrderedDict`s stay `OrderedDict`s; a pickled `utils.HParams` becomes an `HParams` dict.
    """
    path = Path(path)
    zf, tag = _open_zip(path)
    with zf:
        names = zf.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{path}: expected exactly one data.pkl in the archive, found {len(pkl_names)}; "
                "the file is not a PyTorch checkpoint or is damaged"
            )
        folder = pkl_names[0][: -len("data.pkl")]
        byteorder = f"{folder}byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
            if key not in storages:
                member = f"{folder}data/{key}"
                try:
                    buf = zf.read(member)
                except KeyError:
                    raise CheckpointError(f"{path}: storage '{member}' is missing; the file is truncated or damaged") from None
                except (zipfile.BadZipFile, OSError, EOFError) as exc:
                    raise CheckpointError(f"{path}: cannot read storage '{member}' ({exc}); the file is damaged") from None
                dtype = storage_type.dtype
                if len(buf) < numel * dtype.itemsize:
                    raise CheckpointError(
                        f"{path}: storage '{member}' holds {len(buf)} bytes, needs {numel * dtype.itemsize}; the file is damaged"
                    )
                data = np.frombuffer(buf, dtype=dtype, count=numel)
                storages[key] = _Storage(data, is_bf16=storage_type.name == "BFloat16Storage")
            return storages[key]

        try:
            pickled = zf.read(pkl_names[0])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: cannot read {pkl_names[0]} ({exc}); the file is damaged") from None
        try:
            obj = _RestrictedUnpickler(pickled, path=path, load_storage=load_storage).load()
        except CheckpointError:
            raise
        except _CorruptStorage as exc:
            raise CheckpointError(f"{path}: {exc}; the file is damaged") from None
        except Exception as exc:  # malformed pickle stream: report, never guess
            raise CheckpointError(f"{path}: malformed pickle data ({type(exc).__name__}: {exc}); the file is damaged") from None
    return TorchCheckpoint(path=path, obj=obj, version_tag=tag, archive_folder=folder.rstrip("/"))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file into numpy arrays (bfloat16 is widened to float32)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except TypeError:
        # numpy has no bfloat16: re-read those tensors through the raw header.
        out = _read_safetensors_raw(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read safetensors ({exc}); the file is damaged") from None
    return out


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    dtypes = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw[base + start : base + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[key] = arr.copy()
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
        weights = read_safetensors(st)
    elif bin_.exists():
        obj = read_torch_file(bin_).obj
        if not isinstance(obj, dict):
            raise CheckpointError(f"{bin_}: expected a state dict, found {type(obj).__name__}")
        weights = dict(obj)
    else:
        raise FileNotFoundError(
            f"{folder}: no model.safetensors or pytorch_model.bin; "
            "copy the model folder from the PrimeSpeech download into place"
        )
    return normalize_weight_norm_names(weights)


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


def to_plain(obj: Any) -> Any:
    """Convert HParams/OrderedDict nests into plain dicts and lists (for configs)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
