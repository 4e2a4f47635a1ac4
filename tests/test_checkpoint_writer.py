"""The torch-free checkpoint writer and the smoke voice built with it.

Three tiers: writer -> our reader round trips and the byte layout torch relies on (no torch);
real torch and transformers (oracle venv, own process) load what we write; the smoke model
directory loads in the Engine and speaks a few tokens.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickletools
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx import smoke
from dora_primespeech_mlx.weights import HParams, load_hf_weights, read_torch_file, to_plain
from dora_primespeech_mlx.weights.writer import (
    STORAGE_ALIGNMENT,
    torch_file_bytes,
    write_hf_folder,
    write_torch_file,
    write_wordpiece_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
TORCH_READER = ROOT / "tests" / "support" / "torch_reads_checkpoints.py"

DTYPES = ["float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


def sample_tensors() -> collections.OrderedDict:
    """One tensor per dtype plus the awkward cases: empty, views sharing storage, strided, big-endian."""
    rng = np.random.default_rng(0)
    out = collections.OrderedDict()
    for name in DTYPES:
        if name == "bool":
            out[name] = rng.random((3, 5)) > 0.5
        elif name.startswith("float"):
            out[name] = rng.standard_normal((3, 5)).astype(name)
        else:
            info = np.iinfo(name)
            out[name] = rng.integers(info.min, info.max, size=(3, 5), dtype=name, endpoint=True)
    out["empty"] = np.zeros((0,), np.int64)
    out["empty_2d"] = np.zeros((4, 0), np.float16)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    out["base"] = base
    out["rows"] = base[2:4]  # view with an offset
    out["strided"] = base[1::2, ::3]  # non-contiguous view
    out["transposed"] = base.T
    out["base_again"] = base  # the same array under a second key (tied weights)
    out["big_endian"] = np.arange(7, dtype=">f4")
    out["fortran"] = np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))
    out["wide"] = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float16)  # > 3 dims: MARK ... TUPLE
    return out


def sample_config() -> dict:
    return {
        "model": {"hidden": 512, "layers": [1, 2, 3], "name": "gpt", "ratio": 0.25, "flag": True, "none": None,
                  "nested": {"deep": [[1, 3, 5], [1, 3, 5]], "tuple": (1, 2.5, "x", False)}},
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, 2**63, -(2**70), 10**40],
        "floats": [0.0, -1.5, 1e-9, float("inf")],
        "unicode": "你好 — voix",
        "numpy_scalars": [np.float32(0.5), np.int64(7), np.bool_(True)],
        1: "int key",
    }


def assert_same_tensor(got: np.ndarray, want: np.ndarray, key: str) -> None:
    want = np.asarray(want)
    assert got.dtype == want.dtype.newbyteorder("<") or (got.dtype == want.dtype), key
    assert got.shape == want.shape, (key, got.shape, want.shape)
    np.testing.assert_array_equal(got, want, err_msg=key)


def digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def local_entries(raw: bytes) -> list[tuple[str, int, int, int, bytes]]:
    """(name, data offset, size, compression, local extra) of every member, from the local headers."""
    out = []
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
            o = info.header_offset
            sig, _ver, _flag, comp = struct.unpack("<IHHH", raw[o:o + 10])
            assert sig == 0x04034B50
            n_name, n_extra = struct.unpack("<HH", raw[o + 26:o + 30])
            extra = raw[o + 30 + n_name:o + 30 + n_name + n_extra]
            out.append((info.filename, o + 30 + n_name + n_extra, info.file_size, comp, extra))
    return out


# ------------------------------------------------------------------------------ round trips


def test_tensor_round_trip_every_dtype_and_layout(tmp_path):
    tensors = sample_tensors()
    path = write_torch_file(tmp_path / "t.pt", tensors)
    ckpt = read_torch_file(path)
    assert isinstance(ckpt.obj, collections.OrderedDict)
    assert list(ckpt.obj) == list(tensors)
    for key, want in tensors.items():
        assert_same_tensor(ckpt.obj[key], want, key)
    assert ckpt.archive_folder == "t" and ckpt.version_tag is None


def test_zero_dim_tensor_round_trip(tmp_path):
    path = write_torch_file(tmp_path / "s.pt", {"scalar": np.array(2.5, np.float32)})
    got = read_torch_file(path).obj["scalar"]
    assert got.shape == () and got == 2.5


def test_zero_dim_tensor_value_survives(tmp_path):
    path = write_torch_file(tmp_path / "s.pt", {"scalar": np.array(2.5, np.float32), "i": np.array(-3, np.int64)})
    obj = read_torch_file(path).obj
    assert obj["scalar"].size == 1 and float(obj["scalar"].reshape(())) == 2.5
    assert int(obj["i"].reshape(())) == -3


def test_gpt_ckpt_layout_round_trip(tmp_path):
    weight = smoke.materialize(smoke.gpt_params(_tiny_gpt_config()), np.random.default_rng(1))
    config = sample_config()
    path = write_torch_file(tmp_path / "GPT_weights" / "v.ckpt",
                            collections.OrderedDict(weight=weight, config=config, info="GPT-e15"),
                            archive_name="1725955666.654321")
    ckpt = read_torch_file(path)
    assert list(ckpt.obj) == ["weight", "config", "info"] and ckpt.obj["info"] == "GPT-e15"
    assert ckpt.archive_folder == "1725955666.654321"
    assert isinstance(ckpt.obj["weight"], collections.OrderedDict)
    for key, want in weight.items():
        assert_same_tensor(ckpt.obj["weight"][key], want, key)
    got = ckpt.obj["config"]
    want = {k: ([v.item() for v in val] if k == "numpy_scalars" else val) for k, val in config.items()}
    assert got == want
    assert type(got["model"]["nested"]["tuple"]) is tuple and got["ints"][-1] == 10**40
    assert [type(v) for v in got["numpy_scalars"]] == [float, int, bool]


def test_sovits_pth_hparams_and_version_tag(tmp_path):
    config = smoke.as_hparams(smoke.sovits_config())
    weight = {"enc_p.proj.weight": np.ones((4, 2, 1), np.float16), "quantizer.inited": np.ones(1, np.float16)}
    obj = collections.OrderedDict(weight=weight, config=config, info="96epoch_5376iteration")
    plain = read_torch_file(write_torch_file(tmp_path / "a.pth", obj))
    assert isinstance(plain.obj["config"], HParams) and isinstance(plain.obj["config"]["model"], HParams)
    assert plain.obj["config"].model.upsample_rates == [10, 8, 2, 2, 2]
    assert to_plain(plain.obj["config"]) == smoke.sovits_config()
    assert type(plain.obj["weight"]) is dict
    tagged_path = write_torch_file(tmp_path / "b.pth", obj, version_tag="v2Pro")
    assert tagged_path.read_bytes()[:2] == b"05"
    tagged = read_torch_file(tagged_path)
    assert tagged.version_tag == "v2Pro" and set(tagged.obj["weight"]) == set(weight)
    with pytest.raises(ValueError, match="version_tag"):
        write_torch_file(tmp_path / "c.pth", obj, version_tag="v9")


def test_hf_folder_round_trip(tmp_path):
    config = {"model_type": "hubert", "hidden_size": 8}
    state = collections.OrderedDict(
        [("encoder.pos_conv_embed.conv.bias", np.zeros(8, np.float16)),
         ("encoder.pos_conv_embed.conv.weight_g", np.ones((1, 1, 4), np.float16)),
         ("encoder.pos_conv_embed.conv.weight_v", np.full((8, 2, 4), 0.5, np.float16))])
    folder = write_hf_folder(tmp_path / "enc", config, state, extra_files={"preprocessor_config.json": {"a": 1},
                                                                            "README.md": "x\n"})
    assert json.loads((folder / "config.json").read_text()) == config
    assert json.loads((folder / "preprocessor_config.json").read_text()) == {"a": 1}
    assert (folder / "README.md").read_text() == "x\n"
    got = load_hf_weights(folder)
    assert list(got) == list(state)
    for key, want in state.items():
        assert_same_tensor(got[key], want, key)
    assert read_torch_file(folder / "pytorch_model.bin").archive_folder == "pytorch_model"


def test_wordpiece_tokenizer_files_load(tmp_path):
    from tokenizers import Tokenizer

    from dora_primespeech_mlx.models.bert import load_tokenizer

    vocab = smoke.smoke_vocab()
    assert len(vocab) == 21128 and len(set(vocab)) == len(vocab)
    assert [vocab.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    write_wordpiece_tokenizer(tmp_path, vocab)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines() == vocab
    text = "你好,世界."  # normalised Chinese: one token per character
    from_json = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text)
    assert from_json.ids[0] == 101 and from_json.ids[-1] == 102 and len(from_json.ids) == len(text) + 2
    assert 100 not in from_json.ids
    assert from_json.tokens[1:-1] == list(text)
    (tmp_path / "tokenizer.json").unlink()
    assert load_tokenizer(tmp_path).encode(text).ids == from_json.ids  # the vocab.txt fallback agrees
    with pytest.raises(ValueError, match="special tokens"):
        write_wordpiece_tokenizer(tmp_path / "bad", ["a", "b"])


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"obj\['x'\]\[1\].*set"):
        torch_file_bytes({"x": [1, {2}]})
    with pytest.raises(TypeError, match="complex64"):
        torch_file_bytes({"w": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="bytes"):
        torch_file_bytes({"b": b"raw"})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="contains itself"):
        torch_file_bytes(loop)
    with pytest.raises(ValueError, match="archive_name"):
        torch_file_bytes({}, archive_name="a/b")


# ------------------------------------------------------------------------------ byte layout


def test_archive_layout_is_torchs(tmp_path):
    tensors = sample_tensors()
    raw = torch_file_bytes(collections.OrderedDict(weight=tensors, config=sample_config(), info="x"))
    entries = local_entries(raw)
    names = [e[0] for e in entries]
    n_storages = sum(n.startswith("archive/data/") for n in names)
    assert names == (["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment", "archive/byteorder"]
                     + [f"archive/data/{i}" for i in range(n_storages)]
                     + ["archive/version", "archive/.data/serialization_id"])
    # the four views and the repeated array use the base's storage: 19 tensors, 15 storages
    assert len(tensors) == 19 and n_storages == 15
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.read("archive/version") == b"3\n" and zf.read("archive/byteorder") == b"little"
        assert zf.read("archive/.storage_alignment") == str(STORAGE_ALIGNMENT).encode()
        assert zf.read("archive/.format_version") == b"1"
        assert len(zf.read("archive/.data/serialization_id")) == 40
        assert zf.testzip() is None  # CRCs are right
        for info in zf.infolist():
            assert info.extra == b""  # the padding lives in the local headers only
        # storages hold the raw little-endian values
        assert zf.read("archive/data/0") == tensors["float16"].astype("<f2").tobytes()
    for name, offset, size, compression, extra in entries:
        assert compression == zipfile.ZIP_STORED, name  # torch mmaps and reads members in place
        assert offset % STORAGE_ALIGNMENT == 0, (name, offset)
        if extra:
            assert extra[:2] == b"FB" and set(extra[4:]) <= {ord("Z")}


def test_pickle_uses_only_protocol_2_and_the_expected_globals():
    tensors = sample_tensors()
    obj = collections.OrderedDict(weight=tensors, config=smoke.as_hparams({"a": {"b": 1}}), info="x")
    with zipfile.ZipFile(io.BytesIO(torch_file_bytes(obj))) as zf:
        data = zf.read("archive/data.pkl")
    ops = list(pickletools.genops(data))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 2 and ops[-1][0].name == "STOP"
    assert max(op.proto for op, _arg, _pos in ops) <= 2
    globals_ = {arg for op, arg, _pos in ops if op.name == "GLOBAL"}
    assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "utils HParams",
                        "torch HalfStorage", "torch FloatStorage", "torch DoubleStorage", "torch LongStorage",
                        "torch IntStorage", "torch ShortStorage", "torch CharStorage", "torch ByteStorage",
                        "torch BoolStorage"}
    assert sum(op.name == "BINPERSID" for op, _a, _p in ops) == len(tensors)


def test_writing_is_deterministic(tmp_path):
    obj = collections.OrderedDict(weight=sample_tensors(), config=sample_config(), info="x")
    a = write_torch_file(tmp_path / "a.ckpt", obj, archive_name="same").read_bytes()
    b = write_torch_file(tmp_path / "b.ckpt", obj, archive_name="same").read_bytes()
    assert a == b
    assert not list(tmp_path.glob(".*.tmp"))  # temporary files were renamed away


# ------------------------------------------------------------------------------ smoke voice tables


def _tiny_gpt_config() -> dict:
    cfg = smoke.gpt_config()
    cfg["model"].update(n_layer=1)
    return cfg


@pytest.mark.parametrize("table, n_tensors, n_params", [
    (smoke.gpt_params, 295, 77_606_402),  # gptsovits_architecture.md 3.2
    (smoke.sovits_params, 673, 42_389_633),  # 4.7 (without enc_q)
    (smoke.hubert_params, 211, 94_371_712),
    (smoke.bert_params, 395, 325_566_736),
])
def test_smoke_tables_have_the_documented_sizes(table, n_tensors, n_params):
    params = table()
    assert len(params) == n_tensors and len({p.name for p in params}) == n_tensors
    assert sum(math.prod(p.shape) for p in params) == n_params


def test_smoke_tables_equal_the_oracle_files(fixtures):
    """Same keys in the same order, shapes and dtypes as the files torch wrote (reader_refs.json)."""
    reader_refs = json.loads((fixtures.root / "reader_refs.json").read_text())
    tables = {"GPT_weights/doubao-mixed.ckpt": smoke.gpt_params(),
              "SoVITS_weights/doubao-mixed.pth": smoke.sovits_params(),
              "chinese-hubert-base/pytorch_model.bin": smoke.hubert_params(),
              "chinese-roberta-wwm-ext-large/pytorch_model.bin": smoke.bert_params()}
    assert set(tables) == set(reader_refs)
    for rel, params in tables.items():
        ours = [[p.name, "float16", list(p.shape)] for p in params]
        theirs = [[k, dtype, shape] for k, (dtype, shape, _sha) in reader_refs[rel]["tensors"].items()]
        assert ours == theirs, rel
    assert smoke.gpt_config()["model"] == reader_refs["GPT_weights/doubao-mixed.ckpt"]["config"]["model"]
    sov = reader_refs["SoVITS_weights/doubao-mixed.pth"]["config"]
    assert smoke.sovits_config()["model"] == sov["model"]
    assert {k: v for k, v in smoke.sovits_config()["data"].items() if k != "exp_dir"} == \
        {k: v for k, v in sov["data"].items() if k != "exp_dir"}


def test_smoke_weights_are_deterministic_and_non_degenerate():
    params = smoke.sovits_params()
    a = smoke.materialize(params, np.random.default_rng(3))
    b = smoke.materialize(params, np.random.default_rng(3))
    c = smoke.materialize(params, np.random.default_rng(4))
    assert list(a) == [p.name for p in params]
    for key in a:
        assert a[key].dtype == np.float16 and np.isfinite(a[key].astype(np.float32)).all(), key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["dec.conv_pre.weight"], c["dec.conv_pre.weight"])
    # weight_g differs from ||weight_v|| (a loader that ignored g would be caught)
    g = a["dec.ups.0.weight_g"].astype(np.float32).reshape(-1)
    v = a["dec.ups.0.weight_v"].astype(np.float32)
    norm = np.sqrt((v * v).sum(axis=(1, 2)))
    assert np.abs(g / norm - 1).max() > 0.05
    # the flows are not identities, the codebook is random and consistent
    assert np.abs(a["flow.flows.0.post.weight"]).max() > 0
    cb = "quantizer.vq.layers.0._codebook"
    np.testing.assert_array_equal(a[f"{cb}.embed"], a[f"{cb}.embed_avg"])
    bert = smoke.materialize(smoke.bert_params(dict(smoke.bert_config(), num_hidden_layers=1)), np.random.default_rng(0))
    assert bert["cls.predictions.decoder.bias"] is bert["cls.predictions.bias"]  # tied: one storage


# ------------------------------------------------------------------------------ smoke voice: files and engine


@pytest.fixture(scope="session")
def smoke_dir() -> Path:
    return smoke.ensure_smoke_model_dir()


def test_smoke_dir_layout(smoke_dir):
    from dora_primespeech_mlx.voices import VoiceRegistry

    manifest = json.loads((smoke_dir / smoke.MANIFEST_FILE).read_text())
    assert manifest["format_version"] == smoke.SMOKE_FORMAT_VERSION and manifest["seed"] == 0
    assert (smoke_dir / smoke.MARKER_FILE).is_file()
    registry = VoiceRegistry(smoke_dir)
    assert len(registry.builtin_ids) == 15
    for vid in registry.builtin_ids:
        assert registry.get(vid).missing_files() == [], vid
    doubao = registry.get("Doubao")
    for path in (doubao.gpt_weights, doubao.sovits_weights, doubao.reference_audio):
        assert path.is_file() and not path.is_symlink()
    import soundfile

    info = soundfile.info(str(doubao.reference_audio))
    assert 3.0 <= info.duration <= 10.0 and info.samplerate == 32000
    gpt = read_torch_file(doubao.gpt_weights)
    assert gpt.archive_folder == smoke.ARCHIVE_STEM and len(gpt.obj["weight"]) == 295
    assert {v.dtype for v in gpt.obj["weight"].values()} == {np.dtype(np.float16)}
    moyoyo = smoke_dir / "moyoyo"
    for name in ("chinese-hubert-base", "chinese-roberta-wwm-ext-large"):
        assert (moyoyo / name / "config.json").is_file() and (moyoyo / name / "pytorch_model.bin").is_file()
    assert (moyoyo / "chinese-roberta-wwm-ext-large" / "tokenizer.json").is_file()


def test_smoke_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        smoke.build_smoke_model_dir(tmp_path)


@pytest.mark.slow
def test_smoke_build_is_reproducible_and_the_cache_is_current(smoke_dir, tmp_path):
    """A fresh build equals the cached one byte for byte: same seed, same files, and a change to the
    generator that forgot to bump SMOKE_FORMAT_VERSION (so stale caches would be reused) fails here."""
    fresh = smoke.build_smoke_model_dir(tmp_path / "fresh", seed=0)
    try:
        def files(root: Path) -> dict[str, str]:
            return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                               hashlib.sha256(p.read_bytes()).hexdigest())
                    for p in sorted(root.rglob("*")) if p.is_file() and p.name != smoke.MANIFEST_FILE}

        assert files(fresh) == files(smoke_dir)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # 1.1 GB


@pytest.mark.slow
def test_smoke_voice_speaks_through_the_engine(smoke_dir):
    """Every strict loader accepts the files; a short synthesis gives finite, audible, token-sized audio."""
    from dora_primespeech_mlx.engine import Engine
    from dora_primespeech_mlx.options import SynthesisOptions

    engine = Engine(smoke_dir)
    prompt = engine.prepare_voice(engine.registry.get("Doubao"))
    assert prompt.prompt_codes.size > 50 and len(set(prompt.prompt_codes.tolist())) > 10
    assert np.isfinite(prompt.style).all() and np.abs(prompt.style).max() > 0
    tokens: list[int] = []
    options = SynthesisOptions(max_new_tokens=6, seed=7, fragment_interval=0.0, speed=1.0, top_k=1)
    chunks = list(engine.synthesize_stream("你好，世界。", "Doubao", options, streaming=False, on_token=tokens.append))
    assert len(chunks) == 1 and chunks[0].is_final
    assert 1 <= len(tokens) <= 6 and len(set(tokens)) > 1  # greedy decoding does not repeat one token
    audio = chunks[0].audio
    assert audio.size == 2 * len(tokens) * 640  # 2 SoVITS frames of 640 samples per 25 Hz token
    assert np.isfinite(audio).all() and 0.01 < float(np.sqrt(np.mean(audio ** 2))) < 0.9


# ------------------------------------------------------------------------------ real torch reads it (oracle)


def _torch_reads(oracle_python: Path, out: Path, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([str(oracle_python), str(TORCH_READER), str(out), *args], check=False, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _expect_tensor(desc: dict, want: np.ndarray, key: str) -> None:
    want = np.asarray(want)
    assert desc["tensor"] == str(want.dtype.newbyteorder("=")), key
    assert desc["shape"] == list(want.shape), key
    assert desc["sha256"] == digest(want.astype(want.dtype.newbyteorder("<"))), key


def test_torch_load_weights_only_reads_our_files(oracle_python, tmp_path):
    tensors = sample_tensors()
    tensors["scalar"] = np.array(2.5, np.float32)  # 0-d
    config = {k: v for k, v in sample_config().items() if k != "numpy_scalars"}
    ckpt = write_torch_file(tmp_path / "gpt.ckpt", collections.OrderedDict(weight=tensors, config=config,
                                                                             info="GPT-e15"),
                            archive_name="1725955666.654321")
    pth = write_torch_file(tmp_path / "sovits.pth", collections.OrderedDict(
        weight={"enc_p.proj.weight": tensors["float16"]}, config=smoke.as_hparams(smoke.sovits_config()),
        info="96epoch_5376iteration"))
    res = _torch_reads(oracle_python, tmp_path / "torch.json", "torch", str(ckpt), str(pth))

    got = res[str(ckpt)]
    assert got["mmap_equal"]  # torch maps the aligned, uncompressed storages in place
    top = dict(got["plain"]["OrderedDict"])
    assert list(top) == ["weight", "config", "info"] and top["info"] == "GPT-e15"
    weight = dict(top["weight"]["OrderedDict"])
    assert list(weight) == list(tensors)
    for key, want in tensors.items():
        _expect_tensor(weight[key], want, key)
    assert weight["scalar"]["shape"] == [] and weight["empty_2d"]["shape"] == [4, 0]
    # views share the base's storage in torch too, with the offsets and strides of the numpy views
    shared = {k: weight[k]["storage"] for k in ("base", "rows", "strided", "transposed", "base_again")}
    assert len(set(shared.values())) == 1
    assert weight["rows"]["offset"] == 16 and weight["strided"]["stride"] == [16, 3]
    assert weight["transposed"]["stride"] == [1, 8] and weight["fortran"]["stride"] == [1, 3]
    cfg = dict(top["config"]["dict"])
    assert cfg["unicode"] == "你好 — voix" and [v["int"] for v in cfg["ints"]] == [str(i) for i in config["ints"]]
    assert cfg["floats"][:3] == [0.0, -1.5, 1e-9]
    assert dict(cfg["model"]["dict"])["nested"]["dict"][1][1] == {"tuple": [{"int": "1"}, 2.5, "x", False]}

    sov = dict(res[str(pth)]["plain"]["OrderedDict"])
    assert "HParams" in sov["config"]
    model = sov["config"]["HParams"]["model"]["HParams"]
    assert [v["int"] for v in model["upsample_rates"]] == ["10", "8", "2", "2", "2"]


@pytest.mark.slow
def test_torch_and_transformers_read_the_smoke_voice(oracle_python, smoke_dir, tmp_path):
    """torch.load reads the smoke GPT/SoVITS files exactly as our reader does; transformers'
    `from_pretrained` accepts both encoder folders with no missing or unexpected weights."""
    moyoyo = smoke_dir / "moyoyo"
    gpt, sov = moyoyo / "GPT_weights" / "doubao-mixed.ckpt", moyoyo / "SoVITS_weights" / "doubao-mixed.pth"
    res = _torch_reads(oracle_python, tmp_path / "torch.json", "torch", str(gpt), str(sov))
    for path in (gpt, sov):
        top = dict(res[str(path)]["plain"]["OrderedDict"])
        kind = "OrderedDict" if path == gpt else "dict"
        theirs = dict(top["weight"][kind])
        ours = read_torch_file(path).obj["weight"]
        assert list(theirs) == list(ours)
        for key, arr in ours.items():
            _expect_tensor(theirs[key], arr, key)
    for kind, folder, n_params in (("hubert", "chinese-hubert-base", 94_371_712),
                                   ("bert", "chinese-roberta-wwm-ext-large", None)):
        hf = _torch_reads(oracle_python, tmp_path / f"{kind}.json", "hf", kind, str(moyoyo / folder))
        assert hf["missing"] == [] and hf["unexpected"] == [] and hf["mismatched"] == [], (kind, hf)
        if n_params:
            assert hf["n_parameters"] == n_params
        ours = load_hf_weights(moyoyo / folder)
        for key, value in ours.items():
            if key in hf["digests"] and not key.endswith(("weight_g", "weight_v")):
                assert hf["digests"][key] == digest(value.astype(np.float16)), (kind, key)
