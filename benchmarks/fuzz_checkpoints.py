"""Fuzz campaign for the torch-free checkpoint readers and the model loaders behind them.

    python benchmarks/fuzz_checkpoints.py --cases 100000 --workers 2 [--seed 0] [--out out/fuzz]

Seeds. Small valid files in every format the engine reads, written with `weights.writer` (no
torch): a tiny GPT `.ckpt` and a tiny SoVITS `.pth` (HParams config, weight-norm pairs, `enc_q.*`
leftovers) that `load_t2s` / `load_sovits` load, a tiny HuBERT HF folder (`config.json` +
`pytorch_model.bin`, and a `model.safetensors` twin) that `load_hubert` loads, and a "zoo" file with
every storage dtype, views sharing a storage, empty, 0-d, strided and 5-d tensors.

Mutations (1-3 per case, all structure-aware, drawn from a `random.Random` seeded by the case
number, so any case can be replayed alone with `--only N`):
  pickle    tensor offset/size/stride/numel set to edge values (negative, 0, huge, off by one,
            zero-stride expansions), storage dtype/key swaps, opcodes inserted/deleted/duplicated/
            replaced, BUILD applied to a global, memo references redirected, shared-list DAGs and
            deep nests as config values, truncation, byte flips;
  objects   config values replaced by huge/negative/wrong-typed values, configs that are not
            mappings, dropped/renamed/reshaped/retyped tensors, lone weight_g/weight_v;
  zip       members deflated (including a deflate bomb whose pickle agrees with it), header fields
            (flags, method, sizes, offsets, name lengths, end record) set to edge values, members
            duplicated/dropped/renamed, version tags, truncation, appended garbage;
  HF        config.json values and shape, safetensors header dtypes/shapes/offsets/lengths/JSON.

Isolation. Each worker is a fork server: it imports numpy, MLX and the loaders once, then forks one
child per case. The child sets RLIMIT_AS (its address space at fork + 1.5 GiB) and RLIMIT_CPU
(10 s), runs the loader, and reports through a pipe; the worker reaps it with `os.wait4`, which
gives that child's own CPU time and peak RSS. Outcomes: `ok`, `refused` (CheckpointError, or
FileNotFoundError for a removed file), `bug` (any other exception), `crash` (killed by a signal),
`hang` (SIGXCPU, or 30 s of wall time).

Modes. 70% of cases run the real loader (`load`: `load_t2s`, `load_sovits`, `load_hubert`); 30%
run only what the loader does before its first MLX computation (`read`: the reader, the config's
ranges and its check against the tensor shapes), so their memory is the reader's alone.

Memory. A forked child starts with the pages it shares with its parent, so the child records its
RSS right after the fork (`start`), and the fixed cost of each target is measured by running it on
the unmutated seed 12 times per kind and mode (`valid`: median of peak - start, e.g. ~1.4 MB for
the reader, ~6 MB for a tiny GPT load, most of it MLX's first use; `noise`: max - min over those
runs). The allocation a case is charged with is `excess = (peak - start) - valid[kind/mode]`; the
target is `excess <= 4 x file size` wherever excess is above the noise floor, `max(noise, 2 MiB)`:
a code path the valid seed does not take (a bfloat16 widening, an error message, a fresh numpy
routine) faults in up to ~1.1 MB of pages in a forked child whatever the data (tracemalloc peaks of
such cases: < 60 KB; the server runs the MLX-free paths once and freezes its GC before forking to
keep this small). The report gives the largest ratio excess / size among cases above the floor,
and the largest excess overall and in `read` mode.

Why a hand-written mutator with `random` rather than hypothesis or atheris: atheris is not
installed here and its coverage feedback needs instrumented builds; hypothesis is built for
properties with shrinking, spends its budget on generating values from strategies, and has no
notion of "the third stride of the 40th tensor" or "the CRC-correct zip around an edited pickle".
The interesting inputs are real files with one structural field made hostile, which a direct
mutator reaches in every case, at the speed of a fork (~10 ms a case on a 2-core machine), and each
case is a pure function of (seed, case number): reproducible and split across workers by index.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import resource
import select
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

import ckpt_craft as craft

from dora_primespeech_mlx import weights as checkpoint
from dora_primespeech_mlx.weights import common as weights_common
from dora_primespeech_mlx.weights import CheckpointError, HParams
from dora_primespeech_mlx.weights.writer import torch_file_bytes

CPU_LIMIT_S = 10  # RLIMIT_CPU of a case; over it the case is a hang
WALL_LIMIT_S = 30
AS_HEADROOM = 1536 * 1024 * 1024  # address space a case may add to what it has at fork
NOISE_FLOOR_KB = 2048
TARGET_RATIO = 4.0
TARGET_CPU_S = 5.0

# ------------------------------------------------------------------------------------------- seeds


def _t2s_config() -> dict:
    return {"vocab_size": 9, "phoneme_vocab_size": 11, "embedding_dim": 8, "hidden_dim": 8, "head": 2,
            "n_layer": 2, "EOS": 8, "bert_dim": 6, "dropout": 0, "linear_units": 32}


def _sovits_model_config() -> dict:
    return {"inter_channels": 8, "hidden_channels": 8, "filter_channels": 16, "n_heads": 2, "n_layers": 2,
            "kernel_size": 3, "p_dropout": 0.1, "resblock": "1", "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3]], "upsample_rates": [2, 2], "upsample_initial_channel": 8,
            "upsample_kernel_sizes": [4, 4], "gin_channels": 8, "semantic_frame_rate": "25hz",
            "version": "v2", "n_symbols": 20, "ssl_dim": 16, "codebook_size": 16, "style_bins": 16,
            "mrte_channels": 8, "mrte_heads": 2}


def _sovits_data_config() -> dict:
    return {"sampling_rate": 32000, "filter_length": 64, "hop_length": 16, "win_length": 64,
            "max_wav_value": 32768.0, "mel_fmax": None, "add_blank": True}


def _hubert_config() -> dict:
    return {"model_type": "hubert", "conv_dim": [8, 8], "conv_kernel": [4, 2], "conv_stride": [2, 2],
            "conv_bias": False, "feat_extract_norm": "group", "feat_extract_activation": "gelu",
            "feat_proj_layer_norm": True, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2, "do_stable_layer_norm": False}


def _params(model) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(tuple(v.shape)) * 0.1).astype(np.float16)
            for k, v in tree_flatten(model.parameters())}


def build_seeds(folder: Path) -> dict[str, Path]:
    """Write the valid seed files; returns kind -> path (a folder for the HF kinds)."""
    import collections as _c

    from safetensors.numpy import save_file

    from dora_primespeech_mlx.weights.writer import write_hf_folder, write_torch_file
    from dora_primespeech_mlx.models.hubert import HubertConfig, HubertModel
    from dora_primespeech_mlx.models.sovits import SoVITS, SoVITSConfig
    from dora_primespeech_mlx.models.t2s import T2SConfig, T2SGraph

    folder.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}

    cfg = _t2s_config()
    gpt_w = _c.OrderedDict()
    for key, value in _params(T2SGraph(T2SConfig.from_dict(cfg))).items():
        key = key.replace(".in_proj.weight", ".in_proj_weight").replace(".in_proj.bias", ".in_proj_bias")
        gpt_w["model." + key] = value
    gpt = _c.OrderedDict(weight=gpt_w, config={"model": cfg, "train": {"seed": 1234, "epochs": 2},
                                               "data": {"pad_val": 8}}, info="GPT-e2")
    seeds["gpt"] = write_torch_file(folder / "gpt.ckpt", gpt, archive_name="1725955666.654321")

    model_cfg, data_cfg = _sovits_model_config(), _sovits_data_config()
    sov_w: dict[str, np.ndarray] = {}
    for key, value in _params(SoVITS(SoVITSConfig.from_dict({"model": model_cfg, "data": data_cfg}))).items():
        if key == "quantizer.embed":
            key = "quantizer.vq.layers.0._codebook.embed"
            sov_w["quantizer.vq.layers.0._codebook.embed_avg"] = value.copy()
        if key.startswith("dec.ups.") and key.endswith(".weight"):  # weight-norm pair, MLX layout
            v = value.astype(np.float32)
            sov_w[key + "_g"] = np.sqrt((v * v).sum(axis=(1, 2), keepdims=True)).astype(np.float16)
            sov_w[key + "_v"] = value
            continue
        sov_w[key] = value
    sov_w["enc_q.proj.weight"] = np.ones((4, 2, 1), np.float16)
    sov_w["quantizer.vq.layers.0._codebook.inited"] = np.ones(1, np.float16)
    hp = HParams(model=HParams(model_cfg), data=HParams(data_cfg),
                 train=HParams(seed=1234, betas=[0.8, 0.99]), version="v2")
    sov = _c.OrderedDict(weight=sov_w, config=hp, info="4epoch_16iteration")
    seeds["sovits"] = write_torch_file(folder / "sovits.pth", sov)

    hcfg = _hubert_config()
    hub_w: dict[str, np.ndarray] = _c.OrderedDict()
    for key, value in _params(HubertModel(HubertConfig.from_dict(hcfg))).items():
        if value.ndim == 3:
            value = np.ascontiguousarray(value.transpose(0, 2, 1))  # MLX (O, K, I) -> torch (O, I, K)
        if key == "encoder.pos_conv_embed.conv.weight":
            v = value.astype(np.float32)
            hub_w[key + "_g"] = np.sqrt((v * v).sum(axis=(0, 1), keepdims=True)).astype(np.float16)
            hub_w[key + "_v"] = value
            continue
        hub_w[key] = value
    hub_w["masked_spec_embed"] = np.zeros(8, np.float16)
    seeds["hubert"] = write_hf_folder(folder / "hubert", hcfg, hub_w)
    st_folder = folder / "hubert_st"
    st_folder.mkdir(exist_ok=True)
    (st_folder / "config.json").write_text(json.dumps(hcfg))
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
               .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in hub_w.items()}
    save_file(renamed, str(st_folder / "model.safetensors"))
    seeds["hubert_st"] = st_folder

    rng = np.random.default_rng(1)
    zoo: dict[str, Any] = _c.OrderedDict()
    for name in ("float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8"):
        zoo[name] = (rng.standard_normal((3, 5)) * 50).astype(name)
    zoo["bool"] = rng.random((2, 3)) > 0.5
    base = rng.standard_normal((6, 8)).astype(np.float32)
    zoo.update(base=base, rows=base[2:4], strided=base[1::2, ::3], transposed=base.T, tied=base,
               empty=np.zeros((0,), np.int64), empty_2d=np.zeros((4, 0), np.float16),
               scalar=np.array(2.5, np.float32), wide=rng.standard_normal((2, 1, 3, 2, 2)).astype(np.float16))
    seeds["zoo"] = write_torch_file(folder / "zoo.pt", _c.OrderedDict(weight=zoo, config={"a": [1, 2]}, info="z"))
    return seeds


SEED_KINDS = ("gpt", "sovits", "hubert", "hubert_st", "zoo")


# ---------------------------------------------------------------------------------------- targets


def _patch_hf_cache() -> None:
    """HF loaders read straight from the folder (the convert cache is not what is fuzzed here)."""
    from dora_primespeech_mlx.models import bert, hubert

    hubert.load_hf_weights_cached = checkpoint.load_hf_weights
    bert.load_hf_weights_cached = checkpoint.load_hf_weights


def _import_targets() -> None:
    """Import what the targets need (no MLX computation), so each forked case starts warm."""
    from dora_primespeech_mlx.models import bert, hubert, sovits, t2s  # noqa: F401


def _wrap_config(path: Path, build):
    try:
        return build()
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:  # as the loaders wrap config errors
        raise CheckpointError(f"{path}: bad config ({exc})") from None


def run_reader(kind: str, path: Path) -> None:
    """What the loaders do before the first MLX computation: read, check the config and the tensor
    shapes. No MLX here, so the memory a case takes is the reader's alone."""
    if kind == "gpt":
        from dora_primespeech_mlx.models.t2s import T2SConfig, sanitize
        from dora_primespeech_mlx.models.t2s_io import _read_source

        weights, config = _read_source(path)
        cfg = _wrap_config(path, lambda: T2SConfig.from_dict(config))
        cfg.check_weights(sanitize(weights), path)
    elif kind == "sovits":
        from dora_primespeech_mlx.models.sovits import SoVITSConfig, check_version

        ck = checkpoint.read_torch_file(path)
        obj = ck.obj
        if not isinstance(obj, dict) or "weight" not in obj or "config" not in obj:
            raise CheckpointError(f"{path}: expected 'weight' and 'config'")
        config, weights = checkpoint.plain_config(obj["config"], path), checkpoint.check_state_dict(path, obj["weight"])
        check_version(path, ck.version_tag, config, weights)
        cfg = _wrap_config(path, lambda: SoVITSConfig.from_dict(config))
        cfg.check_weights(weights, path)
    elif kind in ("hubert", "hubert_st"):
        from dora_primespeech_mlx.models.base import read_hf_config
        from dora_primespeech_mlx.models.hubert import HubertConfig

        read_hf_config(path, HubertConfig)
        checkpoint.load_hf_weights(path)
    else:
        run_target(kind, path)


def _warm_up(seeds: dict[str, Path]) -> None:
    """Run the MLX-free code paths once in the fork server, so a child does not pay (in RSS) for
    touching them first: the reader on every seed, a bfloat16 widening, the messages' reprs."""
    for kind, path in seeds.items():
        run_reader(kind, path)
    wide = np.arange(4, dtype=np.uint16).astype(np.uint32)
    wide <<= 16
    checkpoint.short_repr(("storage", wide.view(np.float32), [[1.5, "x"]], {"a": None}))
    for damaged in (b"PK\x03\x04" + bytes(40), b"\x80\x02}q\x00."):
        probe = seeds["zoo"].with_name("warm-up.pt")
        probe.write_bytes(damaged)
        try:
            checkpoint.read_torch_file(probe)
        except CheckpointError as exc:
            traceback.format_exception(exc)
        probe.unlink()


def run_target(kind: str, path: Path) -> None:
    """What a user's load does with the file: the real loader (or reader, for the zoo)."""
    if kind == "gpt":
        from dora_primespeech_mlx.models.t2s_io import load_t2s

        load_t2s(path, compile=False)
    elif kind == "sovits":
        from dora_primespeech_mlx.models.sovits import load_sovits

        load_sovits(path, bucket_frames=0)
    elif kind in ("hubert", "hubert_st"):
        from dora_primespeech_mlx.models.hubert import load_hubert

        load_hubert(path)
    elif kind == "zoo":
        ck = checkpoint.read_torch_file(path)
        obj = ck.obj
        if isinstance(obj, dict):
            checkpoint.to_plain(obj.get("config"))
            weight = obj.get("weight")
            if isinstance(weight, dict):
                sum(int(getattr(v, "size", 0)) for v in weight.values())
    else:
        raise ValueError(kind)


# -------------------------------------------------------------------------------------- mutations

INTERESTING = [-1, -2, -(2**31), -(2**63), 0, 1, 2, 3, 7, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32,
               2**40, 2**62, 2**63, 2**64, 2**200]


def _edge_int(rng: random.Random, value: int) -> int:
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(INTERESTING)
    if choice < 0.8:
        return value + rng.choice([-2, -1, 1, 2, value, -value, 1000 * value + 1])
    return rng.randint(-(10**6), 10**6)


def _interesting_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(14)
    if kind == 0:
        return rng.choice(INTERESTING)
    if kind == 1:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, -1.5, 0.5])
    if kind == 2:
        return rng.choice(["", "x" * rng.randint(1, 300), "v3", "2", "☃", "\x00"])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return [rng.choice(INTERESTING) for _ in range(rng.randint(0, 12))]
    if kind == 6:
        return {}
    if kind == 7 and depth < 3:
        return {"k": _interesting_value(rng, depth + 1)}
    if kind == 8:  # deep nest (> MAX_DEPTH sometimes)
        value: Any = 1
        for _ in range(rng.choice([5, 31, 33, 40, 200])):
            value = [value]
        return value
    if kind == 9:
        return np.zeros(rng.choice([(1,), (3, 3), ()]), np.float16)
    if kind == 10:
        return rng.randint(10**5, 10**9)
    if kind == 11:
        return float(rng.randint(1, 4096))
    if kind == 12:
        return [[rng.randint(-3, 300)] * rng.randint(0, 4)] * rng.randint(0, 4)
    return rng.randint(-10, 10000)


@dataclass
class Case:
    """A mutated seed: files to lay out (name -> bytes; None removes, b'<dir>' makes a folder)."""

    kind: str
    files: dict[str, bytes | None]
    notes: list[str] = field(default_factory=list)

    @property
    def main(self) -> str:
        return {"gpt": "gpt.ckpt", "sovits": "sovits.pth", "zoo": "zoo.pt"}.get(self.kind, "pytorch_model.bin")

    def size(self) -> int:
        return sum(len(v) for v in self.files.values() if v)


class Mutator:
    """All mutations of one seed kind; `case(rng)` draws 1-3 of them."""

    def __init__(self, seeds: dict[str, Path]):
        self.raw: dict[str, dict[str, bytes]] = {}
        self.objects: dict[str, Any] = {}
        for kind, path in seeds.items():
            if path.is_dir():
                self.raw[kind] = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
            else:
                self.raw[kind] = {path.name: path.read_bytes()}
            if kind in ("gpt", "sovits", "zoo"):
                self.objects[kind] = checkpoint.read_torch_file(path).obj
            elif kind == "hubert":
                self.objects[kind] = checkpoint.load_hf_weights(path)

    # -- helpers on the main torch file of a case

    @staticmethod
    def _torch_name(case: Case) -> str | None:
        for name in ("gpt.ckpt", "sovits.pth", "zoo.pt", "pytorch_model.bin"):
            if case.files.get(name):
                return name
        return None

    def _edit_pickle(self, case: Case, rng: random.Random, edit: Callable[[list[craft.Op], random.Random], str]):
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        raw = case.files[name]
        try:
            ops = craft.disassemble(craft.get_pickle(raw))
        except Exception:  # noqa: BLE001 - an earlier mutation broke it: fall back to raw damage
            return self.m_flip_bytes(case, rng)
        note = edit(ops, rng)
        case.files[name] = craft.with_pickle(raw, craft.assemble(ops))
        case.notes.append(note)

    # -- pickle-level

    def m_tensor_int(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            sites = craft.tensor_sites(ops)
            if not sites:
                return "tensor_int:none"
            site = rng.choice(sites)
            which = rng.choice(["offset", "size", "stride", "numel", "stride_zero_bomb", "all"])
            if which == "stride_zero_bomb":
                for i in site.stride:
                    ops[i] = craft.int_op(0)
                for i in site.size:
                    ops[i] = craft.int_op(rng.choice([2**15, 2**20, 2**31]))
                return f"tensor_int:zero_stride_bomb@{site.persid}"
            targets = {"offset": [site.offset], "size": site.size, "stride": site.stride, "numel": [site.numel],
                       "all": [site.offset, *site.size, *site.stride]}[which]
            if not targets:
                return f"tensor_int:{which}:none"
            i = rng.choice(targets)
            old = ops[i].arg
            ops[i] = craft.int_op(_edge_int(rng, int(old)))
            return f"tensor_int:{which}@{i}:{old}->{ops[i].arg}"

        self._edit_pickle(case, rng, edit)

    def m_storage_type(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            sites = craft.tensor_sites(ops)
            if not sites:
                return "storage_type:none"
            site = rng.choice(sites)
            name = rng.choice([*weights_common._STORAGE_DTYPES, "Storage", "UntypedStorage", "ComplexFloatStorage"])
            module = rng.choice(["torch"] * 6 + ["collections", "torch._utils", "builtins", "os"])
            ops[site.storage_type] = craft.Op("GLOBAL", f"{module} {name}")
            return f"storage_type:{module}.{name}"

        self._edit_pickle(case, rng, edit)

    def m_storage_key(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            keys = [i for i, op in enumerate(ops) if op.name in ("BINUNICODE", "SHORT_BINUNICODE")
                    and isinstance(op.arg, str) and op.arg.isdigit()]
            if not keys:
                return "storage_key:none"
            i = rng.choice(keys)
            ops[i] = craft.Op("BINUNICODE", rng.choice([ops[rng.choice(keys)].arg, "999", "", "../../x",
                                                         "0/../0", "a" * 100, "0\x00"]))
            return f"storage_key:{ops[i].arg[:20]!r}"

        self._edit_pickle(case, rng, edit)

    def m_opcode(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            action = rng.choice(["insert", "delete", "dup", "swap", "replace"])
            i = rng.randrange(len(ops))
            if action == "delete":
                del ops[i]
            elif action == "dup":
                ops.insert(i, ops[i])
            elif action == "swap" and i + 1 < len(ops):
                ops[i], ops[i + 1] = ops[i + 1], ops[i]
            else:
                op = rng.choice(_RANDOM_OPS)
                new = craft.Op("RAW", op) if isinstance(op, bytes) else op
                if action == "insert":
                    ops.insert(i, new)
                else:
                    ops[i] = new
            return f"opcode:{action}@{i}"

        self._edit_pickle(case, rng, edit)

    def m_build_global(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            globals_ = [i for i, op in enumerate(ops) if op.name == "GLOBAL"]
            if not globals_:
                return "build_global:none"
            i = rng.choice(globals_)
            state = [craft.Op("EMPTY_DICT"), craft.Op("BINUNICODE", rng.choice(["name", "dtype", "__class__"])),
                     craft.Op("BINUNICODE", "FloatStorage"), craft.Op("SETITEM"), craft.Op("BUILD")]
            ops[i + 1:i + 1] = state
            return f"build_global:{ops[i].arg}"

        self._edit_pickle(case, rng, edit)

    def m_memo(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            gets = [i for i, op in enumerate(ops) if op.name in ("BINGET", "LONG_BINGET")]
            if not gets:
                return "memo:none"
            i = rng.choice(gets)
            ops[i] = craft.Op("LONG_BINGET", rng.choice([0, 1, 5, 2**31 - 1, rng.randrange(4096)]))
            return f"memo@{i}"

        self._edit_pickle(case, rng, edit)

    def m_int_value(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            ints = [i for i, op in enumerate(ops) if op.name in ("BININT1", "BININT2", "BININT", "LONG1")]
            if not ints:
                return "int:none"
            i = rng.choice(ints)
            ops[i] = craft.int_op(_edge_int(rng, int(ops[i].arg)))
            return f"int@{i}"

        self._edit_pickle(case, rng, edit)

    def m_string(self, case: Case, rng: random.Random) -> None:
        def edit(ops, rng):
            strs = [i for i, op in enumerate(ops) if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
            if not strs:
                return "str:none"
            i = rng.choice(strs)
            old = ops[i].arg
            new = rng.choice(["", old + "x", old[:-1], "weight", "config", "model." + old, "☃" * 5, "x" * 5000])
            ops[i] = craft.Op("BINUNICODE", new)
            return f"str@{i}:{old[:30]!r}->{new[:30]!r}"

        self._edit_pickle(case, rng, edit)

    def m_value_bomb(self, case: Case, rng: random.Random) -> None:
        """Replace a one-op value (an int, a float, a string after a key) by a shared-list DAG or a deep nest."""
        def edit(ops, rng):
            spots = [i for i in range(1, len(ops)) if ops[i].name in ("BININT1", "BININT2", "BINFLOAT", "NEWTRUE",
                                                                         "NEWFALSE", "NONE")]
            if not spots:
                return "bomb:none"
            i = rng.choice(spots)
            depth = rng.choice([8, 20, 30, 32, 33, 64, 1000, 20000])
            if rng.random() < 0.5:  # DAG: L[k] = [L[k-1], L[k-1]] through the memo
                seq = [craft.Op("EMPTY_LIST"), craft.Op("LONG_BINPUT", 100000)]
                for k in range(1, depth):
                    seq += [craft.Op("POP"), craft.Op("EMPTY_LIST"), craft.Op("MARK"),
                            craft.Op("LONG_BINGET", 100000 + k - 1),
                            craft.Op("LONG_BINGET", 100000 + k - 1), craft.Op("APPENDS"),
                            craft.Op("LONG_BINPUT", 100000 + k)]
                label = "dag"
            else:  # plain nest
                seq = [craft.Op("EMPTY_LIST")] * depth + [craft.Op("APPEND")] * (depth - 1)
                label = "nest"
            ops[i:i + 1] = seq
            return f"bomb:{label}{depth}@{i}"

        self._edit_pickle(case, rng, edit)

    def m_truncate_pickle(self, case: Case, rng: random.Random) -> None:
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        pkl = craft.get_pickle(case.files[name])
        cut = rng.randrange(len(pkl))
        case.files[name] = craft.with_pickle(case.files[name], pkl[:cut])
        case.notes.append(f"truncate_pickle:{cut}")

    def m_flip_pickle(self, case: Case, rng: random.Random) -> None:
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        pkl = bytearray(craft.get_pickle(case.files[name]))
        for _ in range(rng.randint(1, 8)):
            pkl[rng.randrange(len(pkl))] = rng.randrange(256)
        case.files[name] = craft.with_pickle(case.files[name], bytes(pkl))
        case.notes.append("flip_pickle")

    # -- object-level (rewritten with weights.writer)

    def _rewrite(self, case: Case, obj: Any) -> None:
        name = self._torch_name(case) or case.main
        case.files[name] = torch_file_bytes(obj, archive_name=rng_archive(case))

    def m_config(self, case: Case, rng: random.Random) -> None:
        if case.kind in ("hubert", "hubert_st"):
            return self.m_hf_config(case, rng)
        obj = _clone(self.objects[case.kind])
        config = obj.get("config")
        if rng.random() < 0.1:
            obj["config"] = rng.choice([[1, 2], 5, "config", None, np.zeros(3, np.float16), []])
            case.notes.append("config:not_a_mapping")
        elif isinstance(config, dict):
            path = _random_path(config, rng)
            if path:
                parent, key = path
                if rng.random() < 0.15:
                    del parent[key]
                    case.notes.append(f"config:del:{key}")
                else:
                    parent[key] = _interesting_value(rng)
                    case.notes.append(f"config:{key}={str(parent[key])[:40]}")
        self._rewrite(case, obj)

    def m_weights(self, case: Case, rng: random.Random) -> None:
        if case.kind == "hubert_st":
            return self.m_safetensors(case, rng)
        base = self.objects["hubert" if case.kind == "hubert" else case.kind]
        obj = _clone(base)
        weights = obj["weight"] if case.kind != "hubert" else obj
        keys = list(weights)
        key = rng.choice(keys)
        action = rng.choice(["drop", "rename", "reshape", "retype", "replace", "lone_norm", "extra", "huge_shape"])
        value = weights[key]
        if action == "drop":
            del weights[key]
        elif action == "rename":
            weights[key + rng.choice(["x", ".weight_v", ".weight_g"])] = weights.pop(key)
        elif action == "reshape" and isinstance(value, np.ndarray):
            weights[key] = rng.choice([value.reshape(-1), value[..., None], value.T, value[:1], np.zeros((0,), value.dtype)])
        elif action == "retype" and isinstance(value, np.ndarray):
            weights[key] = value.astype(rng.choice([np.float32, np.int64, np.bool_, np.int8, np.float64]))
        elif action == "replace":
            weights[key] = _interesting_value(rng)
        elif action == "lone_norm":
            g = [k for k in keys if k.endswith(("weight_g", "weight_v"))]
            if g:
                del weights[rng.choice(g)]
        elif action == "extra":
            weights[rng.choice(["h.layers.9.linear1.weight", "model.h.layers.2.linear1.weight", "dec.ups.7.bias",
                                "x" * 300])] = np.ones((2, 2), np.float16)
        elif action == "huge_shape":
            weights[key] = np.zeros(rng.choice([(2**20,), (512, 512), (1, 1, 1, 1, 1, 1)]), np.float16)
        case.notes.append(f"weights:{action}:{key[:40]}")
        if case.kind == "hubert":
            case.files["pytorch_model.bin"] = torch_file_bytes(collections.OrderedDict(weights),
                                                               archive_name="pytorch_model")
        else:
            self._rewrite(case, obj)

    # -- zip-level

    def m_deflate(self, case: Case, rng: random.Random) -> None:
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        raw = case.files[name]
        items = craft.members(raw)
        if rng.random() < 0.3:
            # deflate bomb: one storage becomes 64 MiB of zeros (64 KiB deflated), its numel agrees
            ops = craft.disassemble(craft.get_pickle(raw))
            sites = craft.tensor_sites(ops)
            if sites:
                site = sites[0]
                n_bytes = 64 * 1024 * 1024
                itemsize = {"FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8}.get(
                    str(ops[site.storage_type].arg).split(" ")[-1], 2)
                ops[site.numel] = craft.int_op(n_bytes // itemsize)
                key_op = next(ops[k] for k in range(site.persid - 1, 0, -1) if ops[k].name in
                              ("BINUNICODE", "SHORT_BINUNICODE") and str(ops[k].arg).isdigit())
                pkl_name = craft.pickle_name(raw)
                folder = pkl_name[: -len("data.pkl")]
                member = f"{folder}data/{key_op.arg}"
                items = [(n, craft.assemble(ops) if n == pkl_name else (bytes(n_bytes) if n == member else d))
                         for n, d in items]
                case.files[name] = craft.build_zip(items, deflate={member})
                case.notes.append("deflate:bomb")
                return
        chosen = {n for n, _d in items if rng.random() < 0.3} or {rng.choice(items)[0]}
        case.files[name] = craft.build_zip(items, deflate=chosen)
        case.notes.append(f"deflate:{len(chosen)}")

    def m_zip_field(self, case: Case, rng: random.Random) -> None:
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        raw = case.files[name]
        try:
            layout = craft.zip_layout(raw)
        except Exception:  # noqa: BLE001
            return self.m_flip_bytes(case, rng)
        member = rng.choice(list(layout.central))
        where = rng.choice(["cd", "local", "eocd"])
        # (offset within the record, struct format, label)
        fields = {"cd": [(8, "<H", "flags"), (10, "<H", "method"), (16, "<L", "crc"), (20, "<L", "csize"),
                         (24, "<L", "usize"), (28, "<H", "name_len"), (30, "<H", "extra_len"),
                         (32, "<H", "comment_len"), (34, "<H", "disk"), (42, "<L", "offset")],
                  "local": [(6, "<H", "flags"), (8, "<H", "method"), (18, "<L", "csize"), (22, "<L", "usize"),
                            (26, "<H", "name_len"), (28, "<H", "extra_len"), (0, "<L", "signature")],
                  "eocd": [(4, "<H", "disk"), (8, "<H", "n_here"), (10, "<H", "n_total"), (12, "<L", "cd_size"),
                           (16, "<L", "cd_offset"), (20, "<H", "comment_len")]}[where]
        offset, fmt, label = rng.choice(fields)
        base = {"cd": layout.central[member], "local": layout.local[member], "eocd": layout.eocd}[where]
        old = struct.unpack_from(fmt, raw, base + offset)[0]
        limit = 0xFFFF if fmt == "<H" else 0xFFFFFFFF
        new = rng.choice([0, 1, 8, 0x800, 0x808, 0x41, old + 1, old - 1, old * 2, limit, limit - 1,
                          len(raw), rng.randrange(limit + 1)]) & limit
        case.files[name] = craft.patch(raw, base + offset, fmt, new)
        case.notes.append(f"zip:{where}.{label}:{old}->{new}")

    def m_members(self, case: Case, rng: random.Random) -> None:
        name = self._torch_name(case)
        if name is None:
            return self.m_flip_bytes(case, rng)
        items = craft.members(case.files[name])
        action = rng.choice(["dup", "drop", "rename", "reorder", "second_pickle", "big_meta"])
        i = rng.randrange(len(items))
        if action == "dup":
            items.insert(i, items[i])
        elif action == "drop":
            del items[i]
        elif action == "rename":
            items[i] = (items[i][0] + rng.choice(["x", "/", "/data.pkl"]), items[i][1])
        elif action == "reorder":
            rng.shuffle(items)
        elif action == "second_pickle":
            items.append(("other/data.pkl", items[0][1]))
        elif action == "big_meta":
            folder = craft.pickle_name(case.files[name])[: -len("data.pkl")]
            items = [(n, b"big" * 2000 if n == f"{folder}byteorder" else d) for n, d in items]
        try:
            case.files[name] = craft.build_zip(items)
        except Exception:  # noqa: BLE001 - zipfile refuses duplicates on write in some versions
            case.files[name] = case.files[name][: len(case.files[name]) // 2]
        case.notes.append(f"members:{action}")

    def m_flip_bytes(self, case: Case, rng: random.Random) -> None:
        name = rng.choice([n for n, d in case.files.items() if d])
        raw = bytearray(case.files[name])
        for _ in range(rng.randint(1, 16)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        case.files[name] = bytes(raw)
        case.notes.append(f"flip:{name}")

    def m_truncate_file(self, case: Case, rng: random.Random) -> None:
        name = rng.choice([n for n, d in case.files.items() if d])
        raw = case.files[name]
        action = rng.random()
        if action < 0.6:
            case.files[name] = raw[: rng.randrange(len(raw))]
            case.notes.append(f"truncate:{name}")
        elif action < 0.8:
            case.files[name] = raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
            case.notes.append(f"append:{name}")
        else:
            case.files[name] = rng.choice([b"05", b"01", b"09", b"\x80\x02", b"PK"]) + raw[2:]
            case.notes.append(f"tag:{name}")

    # -- HF level

    def m_hf_config(self, case: Case, rng: random.Random) -> None:
        if "config.json" not in case.files or not case.files["config.json"]:
            return self.m_flip_bytes(case, rng)
        roll = rng.random()
        if roll < 0.1:
            case.files["config.json"] = rng.choice([b"[1,2]", b"nope", b"\xff\xfe", b"{" * 5000, b"",
                                                    b'{"hidden_size": 1e999}', b"1" * 5000])
            case.notes.append("hf_config:raw")
            return
        if roll < 0.15:
            case.files["config.json"] = None
            case.notes.append("hf_config:removed")
            return
        config = json.loads(case.files["config.json"])
        key = rng.choice(list(config))
        value = _interesting_value(rng)
        config[key] = value.tolist() if isinstance(value, np.ndarray) else value
        case.files["config.json"] = json.dumps(config, allow_nan=True).encode()
        case.notes.append(f"hf_config:{key}={str(value)[:40]}")

    def m_safetensors(self, case: Case, rng: random.Random) -> None:
        raw = case.files.get("model.safetensors")
        if not raw:
            return self.m_flip_bytes(case, rng)
        (n,) = struct.unpack("<Q", raw[:8])
        try:
            header = json.loads(raw[8:8 + n])
        except ValueError:
            return self.m_flip_bytes(case, rng)
        data = raw[8 + n:]
        keys = [k for k in header if k != "__metadata__"]
        key = rng.choice(keys)
        action = rng.choice(["dtype", "shape", "offsets", "overlap", "drop", "metadata", "header_len", "not_dict",
                             "deep", "extra_field"])
        info = header[key]
        if action == "dtype":
            info["dtype"] = rng.choice(["F32", "F64", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", 5, None])
        elif action == "shape":
            info["shape"] = rng.choice([[], [-1], [2**62], [2**31, 2**31], [0], info["shape"][::-1], "x",
                                        [1.5], [1] * 40])
        elif action == "offsets":
            b, e = info["data_offsets"]
            info["data_offsets"] = rng.choice([[-1, e], [b, len(data) + 1], [e, b], [0, 2**63], [b], "x",
                                               [b, e + 2], [0, len(data)]])
        elif action == "overlap":
            other = header[rng.choice(keys)]
            info["data_offsets"] = list(other["data_offsets"])
            info["dtype"], info["shape"] = other["dtype"], list(other["shape"])
        elif action == "drop":
            del header[key]
        elif action == "metadata":
            header["__metadata__"] = rng.choice([{"a": 1}, [1], "x", {"format": "pt"}, None])
        elif action == "extra_field":
            info["extra"] = 1
        if action == "not_dict":
            blob = rng.choice([b"[1,2]", b"3", b"\"x\""])
        elif action == "deep":
            blob = b"[" * 100000 + b"]" * 100000
        else:
            blob = json.dumps(header).encode()
        length = len(blob)
        if action == "header_len":
            length = rng.choice([0, 1, len(raw), 2**63, 2**40, length + 1, length - 1])
        case.files["model.safetensors"] = struct.pack("<Q", length & 0xFFFFFFFFFFFFFFFF) + blob + data
        case.notes.append(f"safetensors:{action}")

    # -- drawing a case

    def case(self, rng: random.Random) -> Case:
        kind = rng.choices(SEED_KINDS, weights=[3, 3, 2, 1, 2])[0]
        case = Case(kind, dict(self.raw[kind]))
        for _ in range(rng.choices([1, 2, 3], weights=[6, 3, 1])[0]):
            mutation = rng.choices(_MUTATIONS, weights=[w for _n, w in _MUTATION_WEIGHTS])[0]
            try:
                getattr(self, mutation)(case, rng)
            except Exception as exc:  # noqa: BLE001 - a mutation that cannot apply: note it, keep the case
                case.notes.append(f"{mutation}:skipped({type(exc).__name__})")
        return case


_MUTATION_WEIGHTS = [
    ("m_tensor_int", 14), ("m_storage_type", 4), ("m_storage_key", 3), ("m_opcode", 10), ("m_build_global", 3),
    ("m_memo", 3), ("m_int_value", 5), ("m_string", 4), ("m_value_bomb", 3), ("m_truncate_pickle", 3),
    ("m_flip_pickle", 4), ("m_config", 10), ("m_weights", 8), ("m_deflate", 3), ("m_zip_field", 8),
    ("m_members", 4), ("m_flip_bytes", 4), ("m_truncate_file", 4), ("m_hf_config", 4), ("m_safetensors", 5),
]
_MUTATIONS = [n for n, _w in _MUTATION_WEIGHTS]


def _random_ops() -> list:
    ops: list = []
    for op in __import__("pickletools").opcodes:
        kind = op.arg.name if op.arg is not None else None
        arg = {None: None, "uint1": 3, "uint2": 300, "int4": -5, "uint4": 7, "uint8": 9, "long1": 2**70,
               "long4": -(2**40), "float8": 1.5, "unicodestring1": "x", "unicodestring4": "weight",
               "unicodestring8": "y", "bytes1": b"b", "bytes4": b"bb", "bytes8": b"b8", "string1": "s",
               "string4": "s4", "stringnl_noescape_pair": "torch HalfStorage"}.get(kind, "RAW")
        if arg == "RAW":
            ops.append(op.code.encode("latin-1") + b"1\n")
        else:
            ops.append(craft.Op(op.name, arg))
    ops += [craft.Op("GLOBAL", "builtins eval"), craft.Op("GLOBAL", "os system"),
            craft.Op("GLOBAL", "collections OrderedDict"), craft.Op("GLOBAL", "utils HParams"),
            craft.Op("GLOBAL", "torch._utils _rebuild_tensor_v2"), b"\x95" + struct.pack("<Q", 2**62)]
    return ops


_RANDOM_OPS = _random_ops()


def rng_archive(case: Case) -> str:
    return "pytorch_model" if case.kind.startswith("hubert") else "archive"


def _clone(obj: Any) -> Any:
    if isinstance(obj, HParams):
        return HParams({k: _clone(v) for k, v in obj.items()})
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _clone(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj  # arrays are never edited in place


def _random_path(config: dict, rng: random.Random) -> tuple[dict, Any] | None:
    node: Any = config
    parent = None
    for _ in range(rng.randint(1, 3)):
        if not isinstance(node, dict) or not node:
            break
        key = rng.choice(list(node))
        parent = (node, key)
        node = node[key]
    return parent


# ------------------------------------------------------------------------------------- the runner


def _write_case(case: Case, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, data in case.files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder if case.kind.startswith("hubert") else folder / case.main


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_isolated(kind: str, path: Path, mode: str = "load") -> dict:
    """Fork, run the target in the child under limits, reap it: outcome, CPU s, peak and start RSS (KB).

    mode "load" runs the real loader, "read" only what precedes its first MLX computation."""
    read_fd, write_fd = os.pipe()
    gc.freeze()  # the child's collector then never writes to (so never copies) the server's objects
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            start = _rss_kb()
            resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + AS_HEADROOM,) * 2)
            resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S + 1))
            try:
                (run_target if mode == "load" else run_reader)(kind, path)
                result = {"outcome": "ok"}
            except CheckpointError as exc:
                result = {"outcome": "refused", "error": "CheckpointError", "message": str(exc)[:300]}
            except FileNotFoundError as exc:
                result = {"outcome": "refused", "error": "FileNotFoundError", "message": str(exc)[:300]}
            except BaseException as exc:  # noqa: BLE001 - this is what the campaign looks for
                result = {"outcome": "bug", "error": type(exc).__name__, "message": str(exc)[:300],
                          "trace": "".join(traceback.format_exception(exc)[-4:])[-1500:]}
            result["start_kb"] = start
            os.write(write_fd, json.dumps(result).encode()[:60000])
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    deadline = time.monotonic() + WALL_LIMIT_S
    chunks = []
    status = rusage = None
    while True:
        ready, _w, _x = select.select([read_fd], [], [], 0.05)
        if ready:
            chunk = os.read(read_fd, 65536)
            if chunk:
                chunks.append(chunk)
                continue
        done, st, ru = os.wait4(pid, os.WNOHANG)
        if done:
            status, rusage = st, ru
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _done, status, rusage = os.wait4(pid, 0)
            break
    while True:  # drain what the child wrote before it exited
        ready, _w, _x = select.select([read_fd], [], [], 0)
        if not ready:
            break
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    cpu = rusage.ru_utime + rusage.ru_stime
    record: dict[str, Any] = {"cpu_s": round(cpu, 4), "peak_kb": rusage.ru_maxrss}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        timed_out = sig == signal.SIGXCPU or (sig == signal.SIGKILL and time.monotonic() > deadline)
        record.update(outcome="hang" if timed_out else "crash", signal=signal.Signals(sig).name)
        return record
    try:
        record.update(json.loads(b"".join(chunks)))
    except ValueError:
        record.update(outcome="crash", error=f"exit {os.WEXITSTATUS(status)} without a report")
    return record


MODES = ("load", "read")


def measure_baselines(seeds: dict[str, Path], runs: int = 12) -> dict[str, dict]:
    """Per seed kind and mode ("gpt/load", ...): (peak - start) of the unmutated seed, median and
    spread over `runs` children, in KB."""
    out = {}
    for kind, path in seeds.items():
        for mode in MODES:
            deltas = []
            for _ in range(runs):
                rec = run_isolated(kind, path, mode)
                if rec["outcome"] != "ok":
                    raise RuntimeError(f"the valid {kind} seed does not {mode}: {rec}")
                deltas.append(rec["peak_kb"] - rec["start_kb"])
            out[f"{kind}/{mode}"] = {"valid_kb": statistics.median(deltas), "noise_kb": max(deltas) - min(deltas),
                                     "min_kb": min(deltas), "max_kb": max(deltas)}
    return out


def _worker(worker: int, n_workers: int, cases: list[int], seed: int, seed_dir: Path, out: Path,
            baselines: dict[str, dict]) -> None:
    seeds = {kind: (seed_dir / _SEED_FILES[kind]) for kind in SEED_KINDS}
    mutator = Mutator(seeds)
    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-w{worker}-", dir=_scratch_root()))
    try:
        with open(out / f"cases-{worker}.jsonl", "w") as log:
            for index in cases:
                rng = random.Random(f"{seed}:{index}")
                case = mutator.case(rng)
                mode = "read" if rng.random() < 0.3 else "load"
                path = _write_case(case, scratch / "case")
                rec = run_isolated(case.kind, path, mode)
                size = case.size()
                base = baselines[f"{case.kind}/{mode}"]
                excess = None
                if "start_kb" in rec:
                    excess = rec["peak_kb"] - rec["start_kb"] - base["valid_kb"]
                rec.update(case=index, kind=case.kind, mode=mode, notes=case.notes, size=size, excess_kb=excess,
                           ratio=None if excess is None else round(excess * 1024 / max(size, 1), 3))
                log.write(json.dumps(rec) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_SEED_FILES = {"gpt": "gpt.ckpt", "sovits": "sovits.pth", "hubert": "hubert", "hubert_st": "hubert_st",
               "zoo": "zoo.pt"}


def _scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def campaign(n_cases: int, n_workers: int, seed: int, out: Path, start: int = 0,
             only: list[int] | None = None) -> dict:
    """Run cases [start, start + n_cases) (or `only`) over `n_workers` fork servers; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cases-*.jsonl"):
        old.unlink()
    _patch_hf_cache()
    os.environ.setdefault("DORA_PRIMESPEECH_MLX_CACHE", str(out / "cache"))
    seed_dir = out / "seeds"
    if seed_dir.exists():
        shutil.rmtree(seed_dir)
    # MLX must never compute in a process that later forks (a forked child of a process whose MLX
    # scheduler has started waits forever), so the seeds are built in a child of their own, and
    # this process and the workers only import the loaders: each case's child is the first to compute
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            build_seeds(seed_dir)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    if os.waitpid(pid, 0)[1] != 0:
        raise RuntimeError("building the seed files failed; see the traceback above")
    seeds = {kind: seed_dir / _SEED_FILES[kind] for kind in SEED_KINDS}
    _import_targets()
    _warm_up(seeds)
    t0 = time.perf_counter()
    baselines = measure_baselines(seeds)
    indices = only if only is not None else list(range(start, start + n_cases))
    pids = []
    for w in range(n_workers):
        share = indices[w::n_workers]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(w, n_workers, share, seed, seed_dir, out, baselines)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} fuzz worker(s) failed; see the traceback above")
    summary = summarize(out, baselines, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(out: Path, baselines: dict[str, dict], wall_s: float) -> dict:
    records = [json.loads(line) for f in sorted(out.glob("cases-*.jsonl")) for line in f.read_text().splitlines()]
    outcomes = collections.Counter(r["outcome"] for r in records)
    floor = {k: max(b["noise_kb"], NOISE_FLOOR_KB) for k, b in baselines.items()}
    measured = [r for r in records if r.get("excess_kb") is not None]
    over_floor = [r for r in measured if r["excess_kb"] > floor[f"{r['kind']}/{r['mode']}"]]
    top_ratio = sorted(over_floor, key=lambda r: -r["ratio"])[:10]
    memory_fail = [r for r in over_floor if r["ratio"] > TARGET_RATIO]
    slow = [r for r in records if r["cpu_s"] > TARGET_CPU_S]
    bugs: dict[str, dict] = {}
    for r in records:
        if r["outcome"] in ("bug", "crash", "hang"):
            key = f"{r['outcome']}:{r.get('error') or r.get('signal')}:{str(r.get('message', ''))[:80]}"
            bugs.setdefault(key, {"count": 0, "example": r})["count"] += 1
    refusals = collections.Counter(str(r.get("message", "")).split(": ", 1)[-1][:60] for r in records
                                   if r["outcome"] == "refused")
    return {
        "cases": len(records),
        "wall_s": round(wall_s, 1),
        "cases_per_s": round(len(records) / max(wall_s, 1e-9), 1),
        "outcomes": dict(outcomes),
        "by_kind": dict(collections.Counter(r["kind"] for r in records)),
        "crashes": outcomes.get("crash", 0),
        "hangs": outcomes.get("hang", 0),
        "bugs": outcomes.get("bug", 0),
        "max_cpu_s": max((r["cpu_s"] for r in records), default=0),
        "over_cpu_target": len(slow),
        "baselines_kb": baselines,
        "noise_floor_kb": floor,
        "max_excess_kb": max((r["excess_kb"] for r in measured), default=0),
        "max_excess_kb_read_mode": max((r["excess_kb"] for r in measured if r["mode"] == "read"), default=0),
        "by_mode": dict(collections.Counter(r["mode"] for r in records)),
        "max_ratio_over_floor": top_ratio[0]["ratio"] if top_ratio else 0.0,
        "over_memory_target": len(memory_fail),
        "top_ratio_cases": [{k: r.get(k) for k in ("case", "kind", "mode", "notes", "size", "excess_kb", "ratio",
                                                   "outcome")}
                            for r in top_ratio[:5]],
        "largest_files": max((r["size"] for r in records), default=0),
        "distinct_problems": {k: {"count": v["count"], "case": v["example"]["case"], "kind": v["example"]["kind"],
                                  "notes": v["example"]["notes"], "trace": v["example"].get("trace")}
                              for k, v in sorted(bugs.items())},
        "top_refusals": refusals.most_common(25),
        "mutations": dict(collections.Counter(n.split(":")[0].split("@")[0] for r in records for n in r["notes"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--only", type=int, nargs="*", help="replay just these case numbers")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fuzz")
    args = parser.parse_args(argv)
    summary = campaign(args.cases, args.workers, args.seed, args.out, args.start, args.only)
    brief = {k: summary[k] for k in ("cases", "wall_s", "cases_per_s", "outcomes", "crashes", "hangs", "bugs",
                                     "max_cpu_s", "max_excess_kb", "max_ratio_over_floor", "over_memory_target")}
    print(json.dumps(brief, indent=1))
    if summary["distinct_problems"]:
        print(json.dumps(summary["distinct_problems"], indent=1)[:20000])
    ok = not (summary["crashes"] or summary["hangs"] or summary["bugs"] or summary["over_cpu_target"]
              or summary["over_memory_target"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
