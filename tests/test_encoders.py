"""CNHubert, Chinese RoBERTa and the reference-clip pipeline against the PyTorch oracle (fp32).

Parity tolerances (issue 5): HuBERT last hidden state and BERT hidden state -3 within 1e-4 max abs;
phone-level features built exactly as upstream; prompt codes from a WAV identical to the oracle's.
The full-size models run on the MLX CPU backend, so inputs stay short and each forward runs once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from dora_primespeech_mlx.audio import (
    HUBERT_PAD_SAMPLES,
    load_audio,
    load_reference_audio,
    reference_features,
)
from dora_primespeech_mlx.weights import CheckpointError, load_hf_weights
from dora_primespeech_mlx.models.bert import BertConfig, BertEncoderModel, load_bert, load_tokenizer
from dora_primespeech_mlx.models.hubert import HubertModel, load_hubert

ORACLE_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "oracle" / "refs_encoders.py"
TEXT = "你好,世界."


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_every_parameter_from(model, sanitized: dict[str, np.ndarray]) -> None:
    loaded = params(model)
    assert set(loaded) == set(sanitized)
    for key, value in loaded.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, sanitized[key], err_msg=key)


# ------------------------------------------------------------------------------------------ HuBERT


@pytest.fixture(scope="module")
def hubert(fixtures) -> HubertModel:
    return load_hubert(fixtures.hubert_dir)


@pytest.fixture(scope="module")
def hubert_out(hubert, refs) -> np.ndarray:
    return hubert(refs["in_wav16k_padded"])


def test_hubert_last_hidden_matches_oracle(hubert_out, refs):
    ref = refs["hubert_last_hidden"][0]
    assert hubert_out.shape == ref.shape == (768, 179)
    assert hubert_out.dtype == np.float32
    assert max_abs(hubert_out, ref) <= 1e-4


def test_hubert_frame_count_and_input_checks(hubert, refs):
    n = refs["in_wav16k_padded"].shape[0]
    assert hubert.min_samples == 400
    assert (n - 400) // 320 + 1 == refs["hubert_last_hidden"].shape[-1]
    with pytest.raises(ValueError, match="mono"):
        hubert(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="400 samples"):
        hubert(np.zeros(399, np.float32))


def test_hubert_every_parameter_from_file(hubert, fixtures):
    raw = load_hf_weights(fixtures.hubert_dir)
    sanitized = hubert.sanitize(raw)
    assert "masked_spec_embed" in raw and "masked_spec_embed" not in sanitized  # training-only
    assert "encoder.pos_conv_embed.conv.weight_g" in raw  # the fixture uses the legacy naming
    assert_every_parameter_from(hubert, sanitized)
    assert hubert.sanitize(sanitized).keys() == sanitized.keys()
    for key, value in hubert.sanitize(sanitized).items():
        np.testing.assert_array_equal(value, sanitized[key], err_msg=f"sanitize not idempotent: {key}")


def _write_hubert_safetensors(src: Path, dest: Path, weights: dict[str, np.ndarray]) -> Path:
    dest.mkdir()
    shutil.copy(src / "config.json", dest / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(dest / "model.safetensors"))
    return dest


def test_hubert_loads_parametrizations_naming(hubert, fixtures, tmp_path):
    """transformers >= 4.31 saves `parametrizations.weight.original0/1`; both namings give one model."""
    raw = load_hf_weights(fixtures.hubert_dir)
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
                .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in raw.items()}
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in renamed
    folder = _write_hubert_safetensors(fixtures.hubert_dir, tmp_path / "hubert_st", renamed)
    other = load_hubert(folder)
    expected = params(hubert)
    got = params(other)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_hubert_strict_load(fixtures, tmp_path):
    raw = load_hf_weights(fixtures.hubert_dir)
    missing = dict(raw)
    del missing["encoder.layers.11.final_layer_norm.bias"]
    folder = _write_hubert_safetensors(fixtures.hubert_dir, tmp_path / "missing", missing)
    with pytest.raises(CheckpointError, match=r"(?s)hubert.*encoder\.layers\.11\.final_layer_norm\.bias"):
        load_hubert(folder)
    extra = dict(raw, **{"encoder.layers.12.layer_norm.bias": raw["encoder.layer_norm.bias"]})
    folder = _write_hubert_safetensors(fixtures.hubert_dir, tmp_path / "extra", extra)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.12\.layer_norm\.bias"):
        load_hubert(folder)


# -------------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert(fixtures) -> BertEncoderModel:
    return load_bert(fixtures.bert_dir)


@pytest.fixture(scope="module")
def bert_hidden(bert, refs) -> list[np.ndarray]:
    return bert.hidden_states(refs["bert_input_ids"])


def test_tokenizer_ids_match_oracle(bert, refs):
    assert bert.tokenize(TEXT) == refs["bert_input_ids"][0].tolist()


def test_vocab_txt_fallback_tokenizes_like_tokenizer_json(fixtures, refs, tmp_path):
    vocab = json.loads((fixtures.bert_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    from_vocab = load_tokenizer(tmp_path)
    from_json = load_tokenizer(fixtures.bert_dir)
    assert from_vocab.encode(TEXT).ids == refs["bert_input_ids"][0].tolist()
    for text in ("我们在2024年去了Beijing!", "ＡＢＣ，一二三。", "模型 ok?"):
        assert from_vocab.encode(text).ids == from_json.encode(text).ids, text
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "nowhere")


def test_bert_hidden_state_m3_matches_oracle(bert, bert_hidden, refs):
    # embeddings + the 22 layers GPT-SoVITS reads (HF output_hidden_states[:-2]): hidden_states[-3]
    # of the 24-layer model is the last one the loaded model gives
    assert bert.n_layers == bert.phone_feature_layer == 22 and len(bert.bert.encoder.layer) == 22
    assert len(bert_hidden) == 23
    assert all(h.shape == (8, 1024) for h in bert_hidden)
    assert max_abs(bert_hidden[bert.phone_feature_layer][1:-1], refs["bert_hidden_m3"]) <= 1e-4


def test_phone_features_built_as_upstream(bert, bert_hidden, refs):
    word2ph = refs["bert_word2ph"].tolist()
    feats = bert.phone_features(TEXT, word2ph)
    assert feats.shape == refs["bert_phone_level"].shape == (1024, sum(word2ph))
    assert max_abs(feats, refs["bert_phone_level"]) <= 1e-4
    # the construction itself is exact: our layer -3 rows, CLS/SEP dropped, repeated by word2ph,
    # with only the first 22 layers run
    expected = np.concatenate([np.tile(row, (n, 1)) for row, n in zip(bert_hidden[22][1:-1], word2ph)]).T
    np.testing.assert_array_equal(feats, expected)


def test_phone_features_reject_misaligned_word2ph(bert):
    with pytest.raises(ValueError, match="word2ph has 5 entries"):
        bert.phone_features(TEXT, [2, 2, 1, 2, 2])


def test_bert_every_parameter_from_file(bert, fixtures):
    raw = load_hf_weights(fixtures.bert_dir)
    sanitized = bert.sanitize(raw)
    del raw
    assert not any(k.startswith(("cls.", "bert.pooler.")) for k in sanitized)
    assert bert.sanitize(sanitized).keys() == sanitized.keys()
    # the last two layers are in the file but never loaded (nor the pooler and MLM head)
    unused = [k for k in sanitized if k.startswith(("bert.encoder.layer.22.", "bert.encoder.layer.23."))]
    assert len(unused) == 32
    for k in unused:
        del sanitized[k]
    assert_every_parameter_from(bert, sanitized)


def _tiny_bert_folder(folder: Path, fixtures, weights: dict[str, np.ndarray], cfg: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(fixtures.bert_dir / "tokenizer.json", folder / "tokenizer.json")
    save_file(weights, str(folder / "model.safetensors"))
    return folder


TINY_BERT = dict(vocab_size=21128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu",
                 layer_norm_eps=1e-12, model_type="bert", architectures=["BertForMaskedLM"])


def _tiny_bert_weights(rng) -> dict[str, np.ndarray]:
    model = BertEncoderModel(BertConfig.from_dict(TINY_BERT))
    return {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in tree_flatten(model.parameters())}


def test_bert_loader_accepts_old_names_and_is_strict(fixtures, tmp_path):
    rng = np.random.default_rng(0)
    weights = _tiny_bert_weights(rng)
    # a BertModel save: no "bert." prefix, Google-style gamma/beta, a pooler and position_ids buffer
    old = {k[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in weights.items()}
    old["pooler.dense.weight"] = rng.standard_normal((32, 32)).astype(np.float16)
    old["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    model = load_bert(_tiny_bert_folder(tmp_path / "old", fixtures, old, TINY_BERT))
    # 3 layers in the file, hidden_states[-3] is layer 1's output: only layer 0 is loaded
    assert_every_parameter_from(model, {k: v.astype(np.float32) for k, v in weights.items()
                                        if not k.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2."))})
    hs = model.hidden_states(model.tokenize(TEXT), n_layers=1)
    assert len(hs) == 2 and hs[0].shape == (8, 32)
    with pytest.raises(ValueError, match="holds 1 of 3 layers"):
        model.hidden_states(model.tokenize(TEXT), n_layers=2)

    missing = {k: v for k, v in weights.items() if k != "bert.encoder.layer.2.output.dense.bias"}
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.2\.output\.dense\.bias"):
        load_bert(_tiny_bert_folder(tmp_path / "missing", fixtures, missing, TINY_BERT))
    extra = dict(weights, **{"bert.encoder.layer.3.output.dense.bias": weights["bert.encoder.layer.2.output.dense.bias"]})
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.3\.output\.dense\.bias"):
        load_bert(_tiny_bert_folder(tmp_path / "extra", fixtures, extra, TINY_BERT))


def test_bert_hidden_states_input_checks(fixtures, tmp_path):
    model = load_bert(_tiny_bert_folder(tmp_path / "tiny", fixtures, _tiny_bert_weights(np.random.default_rng(1)),
                                        TINY_BERT))
    with pytest.raises(ValueError, match="16 positions"):
        model.hidden_states(np.ones(17, np.int64))
    with pytest.raises(ValueError, match="token ids"):
        model.hidden_states([101, 21128, 102])


# ------------------------------------------------------------------------------- reference audio


def test_prompt_codes_from_oracle_hubert_input(hubert_out, refs, fixtures):
    from dora_primespeech_mlx.models.sovits import load_sovits

    sovits = load_sovits(fixtures.sovits_path)
    codes = sovits.extract_latent(hubert_out)
    np.testing.assert_array_equal(codes, refs["prompt_codes_from_hubert"][0, 0])


def test_reference_features_from_wav_match_oracle(hubert, fixtures, oracle_python, tmp_path):
    """The whole reference pipeline on the fixture WAV (3.6 s, 32 kHz PCM16) against upstream's graph.

    The oracle venv has no soxr, so it runs HuBERT + extract_latent on our 16 kHz waveform; the
    resampling itself is soxr HQ, the call librosa.load makes.
    """
    from dora_primespeech_mlx.models.sovits import load_sovits

    ref = load_reference_audio(fixtures.ref_wav)
    assert ref.wav16k_padded.shape == (57600 + HUBERT_PAD_SAMPLES,) and HUBERT_PAD_SAMPLES == 9600
    assert not ref.wav16k_padded[-9600:].any() and ref.wav16k_padded[:57600].any()
    assert ref.wav32k.shape == (115200,) and abs(ref.seconds - 3.6) < 1e-9
    wav_file = tmp_path / "wav16k_padded.npy"
    np.save(wav_file, ref.wav16k_padded)
    out = tmp_path / "oracle.npz"
    subprocess.run([str(oracle_python), str(ORACLE_SCRIPT), str(fixtures.moyoyo), str(wav_file), str(out)],
                   check=True, capture_output=True, text=True)
    with np.load(out) as f:
        oracle_hidden, oracle_codes = f["hubert_last_hidden"][0], f["prompt_codes"][0, 0]

    seen = {}

    def recording_hubert(wav: np.ndarray) -> np.ndarray:  # one forward serves both checks
        seen["input"], seen["hidden"] = wav, hubert(wav)
        return seen["hidden"]

    sovits = load_sovits(fixtures.sovits_path)
    codes, spec = reference_features(ref, recording_hubert, sovits)
    assert seen["input"] is ref.wav16k_padded
    assert max_abs(seen["hidden"], oracle_hidden) <= 1e-4
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, oracle_codes)
    assert spec.shape == (1025, 115200 // 640)
    np.testing.assert_array_equal(spec, sovits.spectrogram(ref.wav32k))


def _write(path: Path, data: np.ndarray, rate: int) -> Path:
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def test_reference_duration_limits_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    short = _write(tmp_path / "short.wav", 0.1 * rng.standard_normal(int(2.9 * 16000)), 16000)
    with pytest.raises(ValueError, match=r"short\.wav: reference audio lasts 2\.90 s.*3-10 s"):
        load_reference_audio(short)
    long = _write(tmp_path / "long.flac", 0.1 * rng.standard_normal(int(10.5 * 22050)), 22050)
    with pytest.raises(ValueError, match=r"long\.flac: reference audio lasts 10\.50 s"):
        load_reference_audio(long)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_reference_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match=r"bad\.wav: cannot read audio"):
        load_reference_audio(bad)


def test_stereo_mixed_to_mono_then_resampled(tmp_path):
    import soxr

    rng = np.random.default_rng(1)
    stereo = (0.2 * rng.standard_normal((int(3.5 * 44100), 2))).astype(np.float32)
    path = _write(tmp_path / "stereo.wav", stereo, 44100)
    pcm, _ = sf.read(str(path), dtype="float32")
    mono = pcm.mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(load_audio(path, 16000), soxr.resample(mono, 44100, 16000, quality="HQ"))
    ref = load_reference_audio(path)
    assert ref.wav16k_padded.shape[0] == 56000 + 9600 and ref.wav32k.shape[0] == 112000
    # a file already at the target rate is used as read
    same = _write(tmp_path / "mono16k.wav", stereo[:, 0], 16000)
    np.testing.assert_array_equal(load_audio(same, 16000), sf.read(str(same), dtype="float32")[0])


def test_clipping_reference_is_scaled_for_the_spectrogram(tmp_path):
    t = np.arange(int(3.2 * 32000)) / 32000
    loud = (1.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    path = tmp_path / "loud.wav"
    sf.write(str(path), loud, 32000, subtype="FLOAT")
    ref = load_reference_audio(path)
    peak = float(np.abs(loud).max())
    np.testing.assert_allclose(ref.wav32k, loud / peak, rtol=0, atol=1e-7)

