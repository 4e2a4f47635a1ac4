"""The torch-free reader against torch.load (digests written by the oracle) and against hostile files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx.weights import (
    CheckpointError,
    HParams,
    fuse_weight_norm,
    load_hf_weights,
    normalize_weight_norm_names,
    read_safetensors,
    read_torch_file,
    to_plain,
)

FILES = {
    "GPT_weights/doubao-mixed.ckpt": 295,
    "SoVITS_weights/doubao-mixed.pth": 673,
    "chinese-hubert-base/pytorch_model.bin": 211,
    "chinese-roberta-wwm-ext-large/pytorch_model.bin": None,
}


def digest(arr: np.ndarray) -> list:
    arr = np.ascontiguousarray(arr)
    return [str(arr.dtype), list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]


@pytest.fixture(scope="module")
def reader_refs(fixtures):
    return json.loads((fixtures.root / "reader_refs.json").read_text())


@pytest.mark.parametrize("rel", list(FILES))
def test_reader_equals_torch_load(fixtures, reader_refs, rel):
    ckpt = read_torch_file(fixtures.moyoyo / rel)
    obj = ckpt.obj
    expected = reader_refs[rel]
    state = obj["weight"] if expected["top_level"] else obj
    assert set(state) == set(expected["tensors"])
    if FILES[rel] is not None:
        assert len(state) == FILES[rel]
    for key, value in state.items():
        assert digest(value) == expected["tensors"][key], key
    if expected["top_level"]:
        assert list(obj.keys()) == expected["top_level"]
        assert to_plain(obj["config"]) == expected["config"]
        assert obj["info"] == expected["info"]
    assert ckpt.version_tag is None


def test_archive_folder_is_not_assumed(fixtures):
    # upstream saves through "<time>.pth", so the folder inside the zip is that stem
    ckpt = read_torch_file(fixtures.gpt_path)
    assert ckpt.archive_folder not in ("", "archive")
    with zipfile.ZipFile(fixtures.gpt_path) as zf:
        assert f"{ckpt.archive_folder}/data.pkl" in zf.namelist()


def test_sovits_config_is_hparams(fixtures):
    cfg = read_torch_file(fixtures.sovits_path).obj["config"]
    assert isinstance(cfg, HParams) and isinstance(cfg["model"], HParams)
    assert cfg.model.upsample_rates == [10, 8, 2, 2, 2]
    assert cfg.data.hop_length == 640


def test_version_tag_is_read(fixtures, tmp_path):
    raw = fixtures.sovits_path.read_bytes()
    tagged = tmp_path / "v2pro.pth"
    tagged.write_bytes(b"05" + raw[2:])
    ckpt = read_torch_file(tagged)
    assert ckpt.version_tag == "v2Pro"
    assert len(ckpt.obj["weight"]) == 673


def test_hf_folder_both_weight_norm_namings(fixtures, tmp_path):
    from safetensors.numpy import save_file

    legacy = load_hf_weights(fixtures.hubert_dir)
    assert "encoder.pos_conv_embed.conv.weight_g" in legacy
    renamed = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1"): v
        for k, v in legacy.items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    modern = load_hf_weights(tmp_path)
    assert set(modern) == set(legacy)
    for k in legacy:
        np.testing.assert_array_equal(modern[k], legacy[k])
    assert set(read_safetensors(tmp_path / "model.safetensors")) == set(renamed)


def test_normalize_names_is_idempotent():
    w = {"a.parametrizations.weight.original0": np.ones(1), "a.parametrizations.weight.original1": np.ones(2)}
    once = normalize_weight_norm_names(w)
    assert set(once) == {"a.weight_g", "a.weight_v"}
    assert normalize_weight_norm_names(once).keys() == once.keys()


def test_fuse_weight_norm_matches_definition():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, 3, 5)).astype(np.float32)
    g = rng.standard_normal((4, 1, 1)).astype(np.float32)
    w = fuse_weight_norm(g, v)
    for o in range(4):
        np.testing.assert_allclose(w[o], g[o] * v[o] / np.linalg.norm(v[o]), rtol=1e-6)
    g2 = rng.standard_normal((1, 1, 5)).astype(np.float32)
    w2 = fuse_weight_norm(g2, v, dim=2)
    for t in range(5):
        np.testing.assert_allclose(w2[:, :, t], g2[0, 0, t] * v[:, :, t] / np.linalg.norm(v[:, :, t]), rtol=1e-6)


# ---------------------------------------------------------------------------- hostile input


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _write_torch_like_zip(path: Path, payload: bytes, folder: str = "archive") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/data.pkl", payload)
        zf.writestr(f"{folder}/version", "3\n")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _write_torch_like_zip(evil, pickle.dumps({"weight": _Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as exc:
        read_torch_file(evil)
    msg = str(exc.value)
    assert str(evil) in msg and ("posix.system" in msg or "os.system" in msg)
    assert not marker.exists()


def test_builtin_eval_is_refused(tmp_path):
    class EvalReduce:
        def __reduce__(self):
            return (eval, ("1+1",))

    path = tmp_path / "eval.pth"
    _write_torch_like_zip(path, pickle.dumps(EvalReduce(), protocol=2), folder="1725955666.654321")
    with pytest.raises(CheckpointError, match=r"(__builtin__|builtins)\.eval"):
        read_torch_file(path)


def test_truncated_file_names_the_file(fixtures, tmp_path):
    raw = fixtures.sovits_path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_torch_file(bad)


def test_corrupt_storage_is_detected(fixtures, tmp_path):
    # shrink one storage so the tensor no longer fits: must not return garbage
    src = fixtures.sovits_path
    bad = tmp_path / "short_storage.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        storages = [n for n in zin.namelist() if "/data/" in n and not n.endswith("serialization_id")]
        victim = max(storages, key=lambda n: zin.getinfo(n).file_size)
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data[:16] if name == victim else data)
    with pytest.raises(CheckpointError, match="short_storage.pth"):
        read_torch_file(bad)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x80\x02}q\x00."])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        read_torch_file(bad)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_torch_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_hf_weights(tmp_path)


# ---------------------------------------------------------------------------- issue 18: memory safety

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import ckpt_craft as craft  # noqa: E402

from dora_primespeech_mlx import weights as checkpoint  # noqa: E402
from dora_primespeech_mlx.weights import torch_file as weights_torch_file  # noqa: E402
from dora_primespeech_mlx.weights import unpickler as weights_unpickler  # noqa: E402
from dora_primespeech_mlx.weights.writer import torch_file_bytes  # noqa: E402


def _small_file(tmp_path: Path, name: str = "small.ckpt", obj=None) -> Path:
    obj = obj if obj is not None else {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}
    path = tmp_path / name
    path.write_bytes(torch_file_bytes(obj))
    return path


def _edit(path: Path, edit) -> Path:
    """Apply `edit(ops)` to the pickle of `path` in place (the zip is rebuilt with right CRCs)."""
    raw = path.read_bytes()
    ops = craft.disassemble(craft.get_pickle(raw))
    edit(ops)
    path.write_bytes(craft.with_pickle(raw, craft.assemble(ops)))
    return path


def _read_in_child(path: Path, extra_mb: int = 256) -> tuple[str, str, int]:
    """read_torch_file in a forked child with its address space capped at +extra_mb: (outcome, message,
    peak RSS growth in KB). A crash or an allocation past the cap shows up as an outcome, not as a dead
    test run. The child only runs numpy code."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            with open("/proc/self/statm") as fh:
                vm_pages, rss_pages = (int(x) for x in fh.read().split()[:2])
            page = os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm_pages * page + extra_mb * 2**20,) * 2)
            try:
                read_torch_file(path)
                result = ["ok", ""]
            except CheckpointError as exc:
                result = ["CheckpointError", str(exc)]
            except BaseException as exc:  # noqa: BLE001
                result = [type(exc).__name__, str(exc)]
            result.append(rss_pages * page // 1024)
            os.write(write_fd, json.dumps(result).encode()[:30000])
        finally:
            os._exit(0)
    os.close(write_fd)
    _pid, status, usage = os.wait4(pid, 0)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", "", usage.ru_maxrss
    outcome, message, start_kb = json.loads(data)
    return outcome, message, usage.ru_maxrss - start_kb


def _site(ops):
    (site,) = craft.tensor_sites(ops)
    return site


@pytest.mark.parametrize("field, value, words", [
    ("stride0", -4, "negative"),  # was SIGSEGV
    ("offset", -1, "negative"),  # was: bytes from before the storage as weights
    ("offset", 1, "reads element 16 of a storage of 16"),
    ("stride1", 2, "reads element"),
    ("size0", 5, "elements from a storage of 16"),
    ("numel", 15, "holds 64 bytes"),
])
def test_tensor_views_are_checked_against_their_storage(tmp_path, field, value, words):
    def edit(ops):
        site = _site(ops)
        index = {"stride0": site.stride[0], "stride1": site.stride[1], "offset": site.offset,
                 "size0": site.size[0], "numel": site.numel}[field]
        ops[index] = craft.int_op(value)

    path = _edit(_small_file(tmp_path), edit)
    outcome, message, _grew = _read_in_child(path)
    assert outcome == "CheckpointError" and str(path) in message and words in message


def test_zero_stride_expansion_of_a_tiny_file_allocates_nothing(tmp_path):
    # 2**15 x 2**15 float32 from a one-element storage: 4 GB from a ~1 KB file before the fix
    def edit(ops):
        site = _site(ops)
        for i in site.size:
            ops[i] = craft.int_op(2**15)
        for i in site.stride:
            ops[i] = craft.int_op(0)

    path = _edit(_small_file(tmp_path, obj={"w": np.ones(16, np.float32).reshape(4, 4)}), edit)
    assert path.stat().st_size < 2048
    outcome, message, grew_kb = _read_in_child(path)
    assert outcome == "CheckpointError" and "elements from a storage of 16" in message
    assert grew_kb < 16 * 1024


def test_deflated_storage_is_refused_before_it_is_inflated(tmp_path):
    path = _small_file(tmp_path)
    raw = path.read_bytes()
    ops = craft.disassemble(craft.get_pickle(raw))
    ops[_site(ops).numel] = craft.int_op(64 * 2**20 // 4)  # the pickle agrees with the bomb
    items = [(n, craft.assemble(ops) if n.endswith("data.pkl") else (bytes(64 * 2**20) if n.endswith("data/0") else d))
             for n, d in craft.members(raw)]
    path.write_bytes(craft.build_zip(items, deflate={"archive/data/0"}))
    assert path.stat().st_size < 200_000
    outcome, message, grew_kb = _read_in_child(path, extra_mb=128)
    assert outcome == "CheckpointError" and "compressed" in message and str(path) in message
    assert grew_kb < 16 * 1024


def _dag_ops(depth: int, memo_base: int = 100000) -> list:
    ops = [craft.Op("EMPTY_LIST"), craft.Op("LONG_BINPUT", memo_base)]
    for k in range(1, depth):
        ops += [craft.Op("POP"), craft.Op("EMPTY_LIST"), craft.Op("MARK"), craft.Op("LONG_BINGET", memo_base + k - 1),
                craft.Op("LONG_BINGET", memo_base + k - 1), craft.Op("APPENDS"), craft.Op("LONG_BINPUT", memo_base + k)]
    return ops


def _with_config_value(tmp_path: Path, value_ops: list) -> Path:
    path = _small_file(tmp_path, obj={"weight": {"w": np.ones(2, np.float16)}, "config": {"model": 7}})

    def edit(ops):
        i = next(i for i, op in enumerate(ops) if op.name == "BININT1" and op.arg == 7)
        ops[i:i + 1] = value_ops

    return _edit(path, edit)


def test_config_of_shared_lists_is_refused_or_walked_once(tmp_path):
    # 2**30 paths through 30 lists: to_plain used to walk every path (it never finished), and anything
    # that prints the config (gpt-sovits-mlx inspect) still would: the reader refuses the expansion
    path = _with_config_value(tmp_path, _dag_ops(30))
    with pytest.raises(CheckpointError, match=f"{path.name}.*expand to more than"):
        read_torch_file(path)
    # a modest DAG is read, and to_plain converts each shared list once, keeping it shared
    path = _with_config_value(tmp_path, _dag_ops(18))
    obj = read_torch_file(path).obj
    t0 = time.perf_counter()
    plain = to_plain(obj["config"])
    assert time.perf_counter() - t0 < 1.0
    node, depth = plain["model"], 0
    while node:
        assert node[0] is node[1]  # the sharing survives: one converted list per pickled list
        node, depth = node[0], depth + 1
    assert depth == 17
    assert checkpoint.plain_config(obj["config"], path)["model"] is not None
    dag: list = []
    for _ in range(30):
        dag = [dag, dag]
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="expand to more than"):
        to_plain({"model": dag}, source="cfg.json")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("depth", [33, 100, 100_000])
def test_deep_nesting_is_refused(tmp_path, depth):
    nest = [craft.Op("EMPTY_LIST")] * depth + [craft.Op("APPEND")] * (depth - 1)
    path = _with_config_value(tmp_path, nest)
    # (the deepest one is stopped earlier, by the memory budget: 100,000 lists from a 200 KB pickle)
    with pytest.raises(CheckpointError, match=f"{path.name}.*(deeper than 32|memory)"):
        read_torch_file(path)
    value: list = []
    for _ in range(40):
        value = [value]
    with pytest.raises(CheckpointError, match="deeper than 32"):
        to_plain({"a": value})
    with pytest.raises(CheckpointError, match="not a mapping"):
        checkpoint.plain_config([1, 2], "x.ckpt")


def test_cycles_are_refused(tmp_path):
    loop = [craft.Op("EMPTY_LIST"), craft.Op("LONG_BINPUT", 9999), craft.Op("LONG_BINGET", 9999), craft.Op("APPEND")]
    path = _with_config_value(tmp_path, loop)
    with pytest.raises(CheckpointError, match="contains itself"):
        read_torch_file(path)


def test_build_on_a_storage_global_is_refused_and_changes_nothing(tmp_path):
    legit = _small_file(tmp_path, "legit.ckpt", {"w": np.arange(6, dtype=np.float16)})
    before = read_torch_file(legit).obj["w"]
    hostile = _small_file(tmp_path, "hostile.ckpt", {"w": np.arange(6, dtype=np.float16)})

    def edit(ops):
        i = next(i for i, op in enumerate(ops) if op.name == "GLOBAL" and op.arg == "torch HalfStorage")
        ops[i + 1:i + 1] = [craft.Op("EMPTY_DICT"), craft.Op("BINUNICODE", "name"),
                            craft.Op("BINUNICODE", "FloatStorage"), craft.Op("SETITEM"), craft.Op("BUILD")]

    _edit(hostile, edit)
    with pytest.raises(CheckpointError, match="sets the state of a _Global"):
        read_torch_file(hostile)
    token = weights_unpickler._STORAGE_GLOBALS["HalfStorage"]
    assert token.name == "HalfStorage" and not hasattr(token, "__dict__")
    with pytest.raises(AttributeError):
        token.name = "FloatStorage"
    after = read_torch_file(legit).obj["w"]
    assert after.dtype == np.float16 and np.array_equal(after, before)


@pytest.mark.parametrize("edit_name", ["encrypted", "method", "overlap", "outside", "name", "cd_count"])
def test_zip_structure_is_checked_before_reading(tmp_path, edit_name):
    path = _small_file(tmp_path)
    raw = path.read_bytes()
    layout = craft.zip_layout(raw)
    storage = "archive/data/0"
    cd, local = layout.central[storage], layout.local[storage]
    if edit_name == "encrypted":
        raw = craft.patch(raw, cd + 8, "<H", 0x1)
        words = "zip flags"
    elif edit_name == "method":
        raw = craft.patch(raw, local + 8, "<H", 8)
        words = "compressed"
    elif edit_name == "overlap":  # two directory entries, one local header
        raw = craft.patch(raw, cd + 42, "<L", layout.local["archive/data.pkl"])
        words = "local header names another file|overlap"
    elif edit_name == "outside":
        raw = craft.patch(raw, cd + 24, "<L", 2**31)
        raw = craft.patch(raw, cd + 20, "<L", 2**31)
        words = "runs into the directory|outside"
    elif edit_name == "name":
        raw = craft.patch(raw, local + 30, "<B", ord("X"))
        words = "names another file"
    else:
        raw = craft.patch(raw, layout.eocd + 10, "<H", 60000)
        raw = craft.patch(raw, layout.eocd + 8, "<H", 60000)
        words = "cannot fit"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=words):
        read_torch_file(path)


def test_pickle_budget_refuses_an_object_bomb(tmp_path):
    # 300,000 empty dicts from ~600 KB of pickle: ~20 MB of Python objects
    bomb = [craft.Op("EMPTY_LIST"), craft.Op("MARK")] + [craft.Op("EMPTY_DICT")] * 300_000 + [craft.Op("APPENDS")]
    path = _with_config_value(tmp_path, bomb)
    with pytest.raises(CheckpointError, match="memory"):
        read_torch_file(path)


def test_pickle_limits_and_unknown_opcodes(tmp_path, monkeypatch):
    path = _small_file(tmp_path)
    monkeypatch.setattr(weights_torch_file, "_MAX_PICKLE", 64)
    with pytest.raises(CheckpointError, match="pickle.*more than the 64"):
        read_torch_file(path)
    monkeypatch.undo()
    _edit(path, lambda ops: ops.insert(1, craft.Op("RAW", b"i__builtin__\neval\n")))
    with pytest.raises(CheckpointError, match="opcode INST"):
        read_torch_file(path)


def test_storage_reused_with_another_dtype_is_refused(tmp_path):
    base = np.arange(8, dtype=np.float32)
    path = _small_file(tmp_path, obj={"a": base, "b": base[2:4]})

    def edit(ops):
        sites = craft.tensor_sites(ops)
        ops[sites[1].storage_type] = craft.Op("GLOBAL", "torch IntStorage")

    _edit(path, edit)
    with pytest.raises(CheckpointError, match="used as FloatStorage"):
        read_torch_file(path)


def _safetensors(tmp_path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


@pytest.mark.parametrize("header, length, words", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, None, "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, "outside"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, "!= byte range"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, "shape"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, None, "shape"),
    ({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, None, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, None, "overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 2**62, "header of"),
    ({"a": [1]}, None, "is not"),
    ({"__metadata__": {"a": 1}}, None, "__metadata__"),
])
def test_safetensors_header_is_validated(tmp_path, header, length, words):
    path = _safetensors(tmp_path, header, bytes(8), length)
    with pytest.raises(CheckpointError, match=words):
        read_safetensors(path)


def test_safetensors_bf16_and_empty(tmp_path):
    bf16 = np.array([1.0, -2.5], np.float32).view(np.uint32) >> 16
    header = {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
              "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [4, 4]}}
    got = read_safetensors(_safetensors(tmp_path, header, bf16.astype("<u2").tobytes()))
    assert got["a"].dtype == np.float32 and got["a"].tolist() == [1.0, -2.5]
    assert got["e"].shape == (0, 3)


def test_hf_folder_is_checked(tmp_path):
    (tmp_path / "pytorch_model.bin").mkdir()
    with pytest.raises(CheckpointError, match="not a file"):
        load_hf_weights(tmp_path)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(torch_file_bytes({"a": np.ones(2, np.float16), "b": "text"}))
    with pytest.raises(CheckpointError, match=r"\['b'\] is a str, not a tensor"):
        load_hf_weights(folder)
    (folder / "pytorch_model.bin").write_bytes(torch_file_bytes(
        {"c.weight_g": np.ones((3, 1, 1), np.float16), "c.weight_v": np.ones((1, 1, 3), np.float16)}))
    with pytest.raises(CheckpointError, match="does not fit weight_v"):
        load_hf_weights(folder)
    (folder / "pytorch_model.bin").write_bytes(torch_file_bytes({"c.weight_v": np.ones((1, 1, 3), np.float16)}))
    with pytest.raises(CheckpointError, match="only one of weight_g/weight_v"):
        load_hf_weights(folder)


@pytest.mark.parametrize("content, words", [(b"[1, 2]", "not a mapping"), (b"{", "not valid JSON"),
                                            (b'{"hidden_size": 1000000000}', "hidden_size"),
                                            (b'{"num_hidden_layers": "12"}', "num_hidden_layers"),
                                            (b" " * (2**20 + 1), "larger than")])
def test_hf_config_json_is_checked_before_the_model_is_built(tmp_path, content, words):
    from dora_primespeech_mlx.models.bert import load_bert
    from dora_primespeech_mlx.models.hubert import load_hubert

    (tmp_path / "config.json").write_bytes(content)
    for load in (load_hubert, load_bert):
        with pytest.raises(CheckpointError, match=words) as exc:
            load(tmp_path)
        assert "config.json" in str(exc.value)


@pytest.mark.parametrize("model, words", [
    ({"hidden_dim": 10**9, "embedding_dim": 10**9}, "embedding_dim"),
    ({"n_layer": 10**7}, "n_layer"),
    ({"vocab_size": "1025"}, "vocab_size"),
    ({"hidden_dim": 4096, "embedding_dim": 4096, "head": 16}, "does not match the weights"),
])
def test_gpt_config_is_checked_before_anything_is_allocated(tmp_path, model, words):
    import tracemalloc

    from dora_primespeech_mlx.models.t2s_io import load_t2s

    config = {"model": dict({"vocab_size": 9, "EOS": 8, "phoneme_vocab_size": 11, "embedding_dim": 8,
                             "hidden_dim": 8, "head": 2, "n_layer": 1, "bert_dim": 6}, **model)}
    path = _small_file(tmp_path, obj={"weight": {"model.bert_proj.weight": np.ones((8, 6), np.float16)},
                                      "config": config})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=words):
            load_t2s(path)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # 4096-wide sine tables alone would be 131 MB


def test_sovits_config_that_is_not_a_mapping_is_refused(tmp_path):
    from dora_primespeech_mlx.models.sovits import load_sovits

    for config in ([1, 2], {"model": [1]}, {"model": {"hidden_channels": 10**9}}):
        path = _small_file(tmp_path, obj={"weight": {"a": np.ones(2, np.float16)}, "config": config})
        with pytest.raises(CheckpointError, match="sovits|SoVITS|mapping"):
            load_sovits(path)


def test_hubert_conv_weights_of_the_wrong_rank_are_refused(tmp_path, monkeypatch):
    # found by the fuzz campaign: sanitize() transposed a 2-D "conv" weight (ValueError, not CheckpointError)
    from dora_primespeech_mlx.weights.writer import write_hf_folder
    from dora_primespeech_mlx.models.hubert import load_hubert

    monkeypatch.setenv("DORA_PRIMESPEECH_MLX_CACHE", str(tmp_path / "cache"))
    config = {"conv_dim": [8, 8], "conv_kernel": [4, 2], "conv_stride": [2, 2], "hidden_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
              "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2}
    folder = write_hf_folder(tmp_path / "hubert", config,
                             {"feature_extractor.conv_layers.1.conv.weight": np.ones((8, 16), np.float16)})
    with pytest.raises(CheckpointError, match=r"conv_layers.1.conv.weight has shape \(8, 16\).*3-D"):
        load_hubert(folder)


@pytest.mark.parametrize("obj, needle", [
    ({"weight": [1, 2], "config": {}}, "should be a mapping"),
    ({"weight": {"w": np.ones(2, np.float32)}, "config": [1, 2]}, "not a mapping"),
    ({"weight": {"w": "text"}, "config": {}}, "not a tensor"),
    ([np.ones(2, np.float32)], "should be a mapping"),
    ({3: np.ones(2, np.float32)}, "non-string key"),
])
def test_cli_inspect_names_the_file_when_the_structure_is_wrong(tmp_path, capsys, obj, needle):
    """`inspect` used to die with AttributeError/TypeError on a checkpoint whose weight or config is
    not a mapping; it now says what is wrong, naming the file, and exits 1."""
    from dora_primespeech_mlx.weights.writer import write_torch_file
    from dora_primespeech_mlx.cli import main

    path = tmp_path / "odd.ckpt"
    write_torch_file(path, obj)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "odd.ckpt" in err and needle in err, err


def test_cli_inspect_summarises_a_checkpoint(tmp_path, capsys):
    from dora_primespeech_mlx.weights.writer import write_torch_file
    from dora_primespeech_mlx.cli import main

    path = tmp_path / "gpt.ckpt"
    write_torch_file(path, {"weight": {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float16)},
                            "config": {"model": {"vocab_size": 1025}}, "info": "e15"})
    assert main(["inspect", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "gpt-sovits-checkpoint" and summary["parameters"] == 10 and summary["tensors"] == 2
    assert summary["config_model"] == {"vocab_size": 1025} and summary["info"] == "e15"
