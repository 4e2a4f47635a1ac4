"""The bottom layer: checkpoint files in, numpy state dicts and plain configs out, without torch.

Readers for torch zip files (`.ckpt`, `.pth`, `pytorch_model.bin`), safetensors and HF folders, all
memory-safe by construction (torch_file.py says how); a writer of the same formats (writer.py, for
the smoke voice and tests); and the generic convert-once cache (cache.py). Nothing here imports the
models or the application; models import from here.
"""

from .common import (
    MAX_DEPTH,
    MAX_EXPANDED,
    VERSION_TAGS,
    CheckpointError,
    HParams,
    release_freed_memory,
    short_repr,
)
from .config import check_float, check_int, check_int_list, plain_config, read_json_config, to_plain
from .safetensors_io import memmap_safetensors, read_safetensors
from .state_dict import (
                         check_state_dict,
                         check_weight_norm_pairs,
                         fuse_weight_norm,
                         load_hf_weights,
                         normalize_weight_norm_names,
)
from .torch_file import TorchCheckpoint, read_torch_file

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPANDED",
    "VERSION_TAGS",
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
    "memmap_safetensors",
    "normalize_weight_norm_names",
    "plain_config",
    "read_json_config",
    "read_safetensors",
    "read_torch_file",
    "release_freed_memory",
    "short_repr",
    "to_plain",
]
