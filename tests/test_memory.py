"""Memory of a resident engine (issue 20, item 6: the three-voice debate), on the oracle's full-size
random-weight models: HuBERT is released once a voice's prompt codes exist (at every precision) and
comes back for a new voice with the same codes; RoBERTa holds only the layers its features use."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten

from dora_primespeech_mlx.audio import reference_features
from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.models.hubert import load_hubert


def mx_baseline() -> int:
    """MLX memory in use before a test builds anything: the suite runs in one process, where other
    files' fixtures may still hold models, so the memory tests measure from here."""
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


def nbytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def expected_codes(fixtures):
    """Prompt codes of the reference clip from a HuBERT and SoVITS loaded on their own (then freed)."""
    from dora_primespeech_mlx.convert import load_sovits_cached

    codes = reference_features(fixtures.ref_wav, load_hubert(fixtures.hubert_dir),
                               load_sovits_cached(fixtures.sovits_path))[0]
    gc.collect()
    mx.clear_cache()
    return np.asarray(codes, np.int64).reshape(-1)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_hubert_released_after_prompt_codes_and_reloaded_for_a_new_voice(fixtures, expected_codes, precision,
                                                                          tmp_path):
    codes = expected_codes
    baseline = mx_baseline()  # what earlier tests of this process still hold (CI runs every file in one)
    engine = Engine(fixtures.model_dir, precision=precision)
    voice = engine.registry.get("Doubao")
    hubert = engine.hubert()
    ref = weakref.ref(hubert)
    hubert_bytes = nbytes(hubert)
    assert hubert_bytes > 300e6  # the full-size model: 0.38 GB in fp32
    del hubert
    prompt = engine.prepare_voice(voice)
    np.testing.assert_array_equal(prompt.prompt_codes, codes)
    assert engine._hubert is None
    gc.collect()
    assert ref() is None, "something still holds the HuBERT model"
    t2s, sov = engine.voice_models(voice)
    resident = nbytes(t2s) + nbytes(sov) + nbytes(engine.bert())
    # what MLX holds is the three resident models, not HuBERT's 0.38 GB as well
    assert mx.get_active_memory() - baseline < resident + hubert_bytes / 4
    assert engine.prepare_voice(voice) is prompt  # prepared once: no reload for the same voice
    assert engine._hubert is None

    # a new voice (another reference clip) needs HuBERT again: loaded, used, released
    wav, sr = sf.read(fixtures.ref_wav, dtype="float32")
    clip = tmp_path / "other.wav"
    sf.write(clip, 0.5 * wav[::-1].copy(), sr)
    other = replace(voice, id="other", reference_audio=clip)
    got = engine.prepare_voice(other).prompt_codes
    assert engine._hubert is None
    if precision == "fp32":
        want = reference_features(clip, load_hubert(fixtures.hubert_dir), sov)[0]
        np.testing.assert_array_equal(got, np.asarray(want, np.int64).reshape(-1))
    assert got.shape != codes.shape or not np.array_equal(got, codes)


# ------------------------------------------------------------------------------------------ RoBERTa

BERT_TEXT = "今天的天气很好"
BERT_WORD2PH = [2] * len(BERT_TEXT)


def test_bert_holds_only_the_layers_its_features_use(fixtures):
    from dora_primespeech_mlx.models.bert import load_bert

    bert = load_bert(fixtures.bert_dir)
    names = {k for k, _ in tree_flatten(bert.parameters())}
    assert bert.n_layers == 22 and len(bert.bert.encoder.layer) == 22
    assert not any(k.startswith(("bert.encoder.layer.22.", "bert.encoder.layer.23.", "bert.pooler", "cls."))
                   for k in names)
    # 22 layers of 12.6 M parameters and the embeddings, fp32: 1.20 GB (24 layers: 1.30 GB)
    assert 1.15e9 < nbytes(bert) < 1.25e9


def test_bert_loads_tensor_by_tensor_without_reading_the_file_whole(fixtures):
    """The anonymous memory of a process loading RoBERTa peaks near the loaded model: the weights
    come from a memory map, one tensor at a time (the old path read the whole state dict into numpy
    first, then cast it to fp32: ~2 GB more). File pages of the map are shared, not counted here."""
    import subprocess
    import sys

    from dora_primespeech_mlx.weights.cache import load_hf_weights_cached

    load_hf_weights_cached(fixtures.bert_dir, mapped=True)  # the cache entry exists (a first load converts)
    code = ("import threading, time; from mlx.utils import tree_flatten\n"
            "peak = [0]\n"
            "def anon():\n"
            "    for line in open('/proc/self/smaps_rollup'):\n"
            "        if line.startswith('Anonymous:'): return int(line.split()[1]) * 1024\n"
            "def watch():\n"
            "    while True: peak[0] = max(peak[0], anon()); time.sleep(0.01)\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            "from dora_primespeech_mlx.models.bert import load_bert\n"
            "base = anon()\n"
            f"b = load_bert({str(fixtures.bert_dir)!r})\n"
            "time.sleep(0.05); peak[0] = max(peak[0], anon())\n"
            "print(peak[0] - base, sum(a.nbytes for _, a in tree_flatten(b.parameters())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak, params = int(out[-2]), int(out[-1])
    print(f"RoBERTa load: anonymous memory peaks {peak / 1e6:.0f} MB above the start for {params / 1e6:.0f} MB "
          "of weights")
    assert params < peak < params + 300e6


def test_bert_streamed_gives_the_same_features_in_a_fraction_of_the_memory(fixtures):
    from dora_primespeech_mlx.models.bert import load_bert

    baseline = mx_baseline()
    resident = load_bert(fixtures.bert_dir)
    want = resident.phone_features(BERT_TEXT, BERT_WORD2PH)
    held = nbytes(resident)
    del resident
    gc.collect()
    mx.clear_cache()
    streamed = load_bert(fixtures.bert_dir, streamed=True)
    assert nbytes(streamed) < 5e6  # the position / type embeddings and LayerNorm only
    got = streamed.phone_features(BERT_TEXT, BERT_WORD2PH)
    np.testing.assert_array_equal(got, want)  # the same computation, to the bit
    # what a call leaves in MLX memory: one layer's weights and the activations, not the model
    assert mx.get_active_memory() - baseline < held / 10
    np.testing.assert_array_equal(streamed.phone_features(BERT_TEXT, BERT_WORD2PH), want)


def test_bert_streamed_in_fp16_matches_resident_fp16(fixtures):
    from dora_primespeech_mlx.models.bert import load_bert

    want = load_bert(fixtures.bert_dir, dtype=mx.float16).phone_features(BERT_TEXT, BERT_WORD2PH)
    got = load_bert(fixtures.bert_dir, dtype=mx.float16, streamed=True).phone_features(BERT_TEXT, BERT_WORD2PH)
    np.testing.assert_array_equal(got, want)


def test_memory_preset_from_the_environment(fixtures, monkeypatch):
    monkeypatch.setenv("MEMORY_PRESET", "low")
    engine = Engine(fixtures.model_dir)
    assert engine.memory_preset == "low"
    assert engine.bert()._streamed is not None
    monkeypatch.delenv("MEMORY_PRESET")
    assert Engine(fixtures.model_dir).memory_preset == "default"
    monkeypatch.setenv("MEMORY_PRESET", "tiny")
    with pytest.raises(ValueError, match="MEMORY_PRESET"):
        Engine(fixtures.model_dir)


def test_bert_streamed_on_a_small_model_and_its_checks(fixtures, tmp_path):
    """A 4-layer model in fp16 safetensors: streamed = resident to the bit; a file missing a layer
    that never runs is refused all the same; bfloat16 (no numpy view) falls back to holding it."""
    import json
    import shutil

    from safetensors.numpy import save_file

    from dora_primespeech_mlx.models.bert import BertConfig, BertEncoderModel, load_bert
    from dora_primespeech_mlx.weights import CheckpointError

    cfg = {"vocab_size": 21128, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
           "intermediate_size": 64, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "model_type": "bert"}
    rng = np.random.default_rng(0)
    full = BertEncoderModel(BertConfig.from_dict(cfg))
    weights = {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in tree_flatten(full.parameters())}

    def folder(name: str, w: dict) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        shutil.copy(fixtures.bert_dir / "tokenizer.json", d / "tokenizer.json")
        save_file(w, str(d / "model.safetensors"))
        return d

    ok = folder("ok", weights)
    resident, streamed = load_bert(ok), load_bert(ok, streamed=True)
    assert resident.n_layers == streamed.n_layers == 2 and streamed._streamed is not None
    np.testing.assert_array_equal(streamed.phone_features("你好", [2, 2]), resident.phone_features("你好", [2, 2]))
    hs_r, hs_s = resident.hidden_states(resident.tokenize("你好")), streamed.hidden_states(streamed.tokenize("你好"))
    assert len(hs_r) == len(hs_s) == 3
    for a, b in zip(hs_r, hs_s):
        np.testing.assert_array_equal(a, b)

    missing = {k: v for k, v in weights.items() if k != "bert.encoder.layer.3.intermediate.dense.weight"}
    for streamed_flag in (False, True):
        with pytest.raises(CheckpointError, match=r"missing bert\.encoder\.layer\.3\.intermediate\.dense\.weight"):
            load_bert(folder(f"missing{streamed_flag}", missing), streamed=streamed_flag)

    bf16 = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in weights.items()}
    d = folder("bf16", {})
    # a bf16 file written by hand: the same header as safetensors.numpy would write, dtype BF16
    header, blobs, offset = {}, [], 0
    for k, v in bf16.items():
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        blobs.append(v.tobytes())
        offset += v.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    from_bf16 = load_bert(d, streamed=True)
    assert from_bf16._streamed is None  # no view of bfloat16: held in memory instead
    np.testing.assert_array_equal(from_bf16.phone_features("你好", [2, 2]), load_bert(d).phone_features("你好", [2, 2]))


def test_low_memory_preset_gives_the_same_audio(fixtures):
    """MEMORY_PRESET=low at fp32 changes where RoBERTa's weights live, not one sample of the audio."""
    from dora_primespeech_mlx.options import SynthesisOptions

    options = SynthesisOptions(max_new_tokens=6, seed=3)
    text = "你好，欢迎。"
    want = Engine(fixtures.model_dir, memory_preset="default").synthesize(text, "Doubao", options).audio
    gc.collect()
    mx.clear_cache()
    low = Engine(fixtures.model_dir, memory_preset="low")
    got = low.synthesize(text, "Doubao", options).audio
    assert low.bert()._streamed is not None and want.size > 0
    np.testing.assert_array_equal(got, want)
