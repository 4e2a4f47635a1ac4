"""Reading a torch zip file (`.ckpt`, `.pth`, `pytorch_model.bin`) without torch.

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

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .archive import _Archive
from .common import _MAX_META, _MAX_PICKLE, _STORAGE_DTYPES, VERSION_TAGS, CheckpointError, _Budget
from .unpickler import _SafeUnpickler, _Storage

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


