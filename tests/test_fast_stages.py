"""The fast tier: every stage on tiny random-weight models in the real file formats, no oracle.

tests/support/tiny_models.py writes a `$PRIMESPEECH_MODEL_DIR` (GPT `.ckpt`, SoVITS `.pth`, HF
HuBERT and RoBERTa folders, a reference clip) torch-free in under a second; these tests load it
through the public loaders and the engine. They check properties that hold for any weights
(shapes, lengths, determinism, the KV cache against the teacher-forced prefill, streaming against
the whole decode); parity with upstream is the oracle tests' job.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dora_primespeech_mlx import smoke
from dora_primespeech_mlx.constants import CACHE_ENV
from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.models.bert import load_bert
from dora_primespeech_mlx.models.hubert import load_hubert
from dora_primespeech_mlx.models.sovits import load_sovits
from dora_primespeech_mlx.models.sovits_stream import SoVITSStreamDecoder
from dora_primespeech_mlx.models.t2s_io import load_t2s
from dora_primespeech_mlx.options import SynthesisCancelled, SynthesisOptions
from dora_primespeech_mlx.voices import VoiceRegistry

ON_CUDA = mx.default_device().type == mx.gpu and not mx.metal.is_available()
from dora_primespeech_mlx.weights import CheckpointError
from dora_primespeech_mlx.weights.writer import write_torch_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.fast

HOP = 640
VOICE = "Doubao"  # speaks at speed 1.1


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model dir, built once; conversions are cached in a private folder, not the user's."""
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("tiny-cache"))
    try:
        yield tiny_models.build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "models")
    finally:
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def paths(tiny_dir):
    moyoyo = tiny_dir / "moyoyo"
    voice = VoiceRegistry(tiny_dir).get(VOICE)
    return {"gpt": voice.gpt_weights, "sovits": voice.sovits_weights, "ref": voice.reference_audio,
            "hubert": moyoyo / "chinese-hubert-base", "bert": moyoyo / "chinese-roberta-wwm-ext-large"}


@pytest.fixture(scope="module")
def t2s(paths):
    return load_t2s(paths["gpt"], compile=False)


@pytest.fixture(scope="module")
def sovits(paths):
    return load_sovits(paths["sovits"], bucket_frames=0)


@pytest.fixture(scope="module")
def ge(sovits, paths) -> np.ndarray:
    from dora_primespeech_mlx.audio import load_reference_audio

    return sovits.style_vector(sovits.spectrogram(load_reference_audio(paths["ref"]).wav32k))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """Engine() configures G2PW process-wide (conftest restores it per test, but a module fixture is
    built before that snapshot): put back what was there, so later modules see no change."""
    from dora_primespeech_mlx.text import chinese, g2pw

    resolver, status = chinese._polyphones, g2pw._status
    yield Engine(tiny_dir)
    chinese._polyphones, g2pw._status = resolver, status


def gpt_inputs(n_text: int = 12, n_prompt: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 732, n_text), rng.standard_normal((1024, n_text)).astype(np.float32),
            rng.integers(0, 1024, n_prompt))


def expected_samples(tokens: int, speed: float, interval: float = 0.0) -> int:
    frames = 2 * tokens if speed == 1.0 else int(2 * tokens / speed) + 1
    return frames * HOP + int(round(interval * 32000))


# --------------------------------------------------------------------------------------- loaders


def test_configs_come_from_the_tiny_files(t2s, sovits, paths):
    assert (t2s.config.n_layer, t2s.config.hidden_dim, t2s.config.head, t2s.config.bert_dim) == (2, 64, 4, 1024)
    assert (sovits.config.hidden_channels, sovits.config.ssl_dim, sovits.config.gin_channels) == (32, 64, 512)
    assert load_hubert(paths["hubert"]).config.hidden_size == tiny_models.SSL_DIM
    assert load_bert(paths["bert"]).config.num_hidden_layers == 3


def test_hubert_features(paths):
    hubert = load_hubert(paths["hubert"])
    wav = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    feats = hubert(wav)
    assert feats.dtype == np.float32 and feats.shape == (tiny_models.SSL_DIM, (16000 - 400) // 320 + 1)
    assert np.isfinite(feats).all() and feats.std() > 0.1  # post-norm layers: unit-scale features
    np.testing.assert_array_equal(hubert(wav[None]), feats)  # (1, N) is the same clip
    with pytest.raises(ValueError, match="at least 400 samples"):
        hubert(wav[:399])


def test_bert_phone_features_repeat_per_character(paths):
    bert = load_bert(paths["bert"])
    feats = bert.phone_features("你好世界", [2, 1, 3, 2])
    assert feats.dtype == np.float32 and feats.shape == (1024, 8) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats[:, 0], feats[:, 1])  # a character's phones share its row
    np.testing.assert_array_equal(feats[:, 3], feats[:, 5])
    assert not np.array_equal(feats[:, 1], feats[:, 2])
    with pytest.raises(ValueError, match="word2ph has 3 entries"):
        bert.phone_features("你好世界", [2, 1, 3])


def test_reference_gives_spectrogram_style_and_prompt_codes(sovits, paths, ge):
    from dora_primespeech_mlx.audio import load_reference_audio

    ref = load_reference_audio(paths["ref"])
    spec = sovits.spectrogram(ref.wav32k)
    assert spec.shape == (1025, ref.wav32k.size // HOP) and spec.dtype == np.float32
    assert ge.shape == (512,) and np.isfinite(ge).all()
    feats = load_hubert(paths["hubert"])(ref.wav16k_padded)
    codes = sovits.extract_latent(feats)
    assert codes.dtype == np.int64 and codes.shape == (feats.shape[1] // 2,)
    assert 0 <= codes.min() and codes.max() < 1024 and np.unique(codes).size > 1
    with pytest.raises(ValueError, match="hubert_features"):
        sovits.extract_latent(np.zeros((768, 10), np.float32))


# ------------------------------------------------------------------------------------------- GPT


def test_greedy_decode_is_deterministic_and_stops_at_the_cap(t2s):
    phones, bert, prompt = gpt_inputs()
    a = t2s.generate(phones, bert, prompt, top_k=1, max_new_tokens=8)
    b = t2s.generate(phones, bert, prompt, top_k=1, max_new_tokens=8, seed=99)  # greedy ignores the seed
    assert a.dtype == np.int64 and a.shape == (8,)  # EOS is masked for the first 11 steps
    assert 0 <= a.min() and a.max() < 1024
    np.testing.assert_array_equal(a, b)
    steps = list(t2s.decode_steps(phones, bert, prompt, top_k=1, max_new_tokens=8))
    assert [s.token for s in steps] == a.tolist() and steps[-1].stop_reason == "cap"
    assert list(t2s.generate_stream(phones, bert, prompt, top_k=1, max_new_tokens=8)) == a.tolist()


def test_sampling_follows_the_seed(t2s):
    phones, bert, prompt = gpt_inputs(seed=1)
    runs = [t2s.generate(phones, bert, prompt, top_k=50, temperature=1.5, max_new_tokens=10, seed=s)
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_kv_cache_decode_matches_the_teacher_forced_prefill(t2s):
    """Step k's logits (cached decode) equal the prefill over the prompt plus the first k tokens."""
    phones, bert, prompt = gpt_inputs(seed=2)
    steps = list(t2s.decode_steps(phones, bert, prompt, top_k=1, max_new_tokens=5, with_logits=True))
    tokens = [s.token for s in steps]
    for k in (0, 2, 4):
        full = t2s.prefill_logits(phones, bert, np.concatenate([prompt, np.asarray(tokens[:k], np.int64)]))
        assert full.shape == (phones.size + prompt.size + k, 1025) and np.isfinite(full).all()
        np.testing.assert_allclose(steps[k].logits, full[-1], rtol=1e-4, atol=1e-4)


def test_compiled_decode_equals_eager(paths, t2s):
    phones, bert, prompt = gpt_inputs(seed=3)
    compiled = load_t2s(paths["gpt"], compile=True)
    np.testing.assert_array_equal(compiled.generate(phones, bert, prompt, top_k=5, seed=7, max_new_tokens=12),
                                  t2s.generate(phones, bert, prompt, top_k=5, seed=7, max_new_tokens=12))


# ---------------------------------------------------------------------------------------- SoVITS


def test_decode_length_seed_and_speed(sovits, ge):
    codes, phones = np.array([3, 700, 15, 15, 99, 1023]), np.array([1, 50, 200, 731, 12])
    a = sovits.decode(codes, phones, ge=ge, noise_scale=0.5, seed=1)
    assert a.dtype == np.float32 and a.shape == (expected_samples(6, 1.0),)
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    np.testing.assert_array_equal(a, sovits.decode(codes, phones, ge=ge, noise_scale=0.5, seed=1))
    assert not np.array_equal(a, sovits.decode(codes, phones, ge=ge, noise_scale=0.5, seed=2))  # noise is used
    assert sovits.decode(codes, phones, ge=ge, speed=1.1, seed=1).size == expected_samples(6, 1.1)
    with pytest.raises(ValueError, match="codes must lie"):
        sovits.decode(np.array([1024]), phones, ge=ge)


def test_stream_of_one_window_equals_decode(sovits, ge):
    codes, phones = np.array([5, 6, 7, 8]), np.array([10, 20, 30])
    whole = sovits.decode(codes, phones, ge=ge, noise_scale=0.5, seed=5)
    dec = SoVITSStreamDecoder(sovits, phones, ge=ge, noise_scale=0.5, seed=5)
    parts = [dec.feed(c) for c in codes] + [dec.finish()]
    assert dec.windows == 1 and all(p.size == 0 for p in parts[:-1])
    np.testing.assert_array_equal(np.concatenate(parts), whole)  # mlx-cpu: one algorithm, bit for bit


@pytest.mark.parametrize("speed", [1.0, 1.1])
def test_stream_chunks_join_to_the_whole_length(sovits, ge, speed):
    codes, phones = np.random.default_rng(4).integers(0, 1024, 14), np.array([10, 20, 30, 40])
    dec = SoVITSStreamDecoder(sovits, phones, ge=ge, speed=speed, noise_scale=0.5, seed=2, first_chunk_codes=4,
                              chunk_codes=3, overlap_frames=4, crossfade_frames=2)
    parts = [dec.feed(c) for c in codes] + [dec.finish()]
    assert dec.windows >= 4 and parts[3].size > 0 and all(p.size == 0 for p in parts[:3])
    joined = np.concatenate(parts)
    assert joined.dtype == np.float32 and np.isfinite(joined).all()
    assert joined.size == sovits.decode(codes, phones, ge=ge, speed=speed, seed=2).size == expected_samples(14, speed)


def test_stream_windows_are_exact_given_the_settled_latent(sovits, ge):
    """With enc_p's whole-sequence latent, only windows and cross-fades differ from the whole decode,
    and those reproduce it (exact left context; bound as tests/test_sovits_stream.py)."""
    codes, phones = np.random.default_rng(5).integers(0, 1024, 40), np.array([10, 20, 30, 40, 50])
    whole = sovits.decode(codes, phones, ge=ge, noise_scale=0.5, seed=1)
    g = mx.array(ge)[None, None]
    settled = sovits.enc_p.hidden(sovits.codebook_frames(codes),
                                  sovits.enc_p.encode_text(mx.array(phones[None].astype(np.int32))), g)
    dec = SoVITSStreamDecoder(sovits, phones, ge=ge, noise_scale=0.5, seed=1, first_chunk_codes=20, chunk_codes=15)
    dec._hidden = lambda c: settled[:, : 2 * c.size]
    joined = np.concatenate([dec.feed(codes[:20]), dec.feed(codes[20:35]), dec.feed(codes[35:]), dec.finish()])
    assert dec.windows == 3 and joined.shape == whole.shape
    assert np.abs(joined.astype(np.float64) - whole).max() / np.abs(whole).max() <= 1e-5


# ---------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("text, lang", [("你好，世界。", "zh"), ("Hello there my good friend.", "en")])
def test_engine_synthesises_a_short_sentence(engine, text, lang):
    options = SynthesisOptions(max_new_tokens=6, seed=7, text_lang=lang, fragment_interval=0.1)
    chunks = list(engine.synthesize_stream(text, VOICE, options, streaming=False))
    assert len(chunks) == 1 and chunks[0].is_final
    tokens = int(chunks[0].timings["tokens"])
    assert 1 <= tokens <= 6
    audio = chunks[0].audio
    assert audio.dtype == np.float32 and audio.size == expected_samples(tokens, 1.1, 0.1)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0 and np.abs(audio[:-3200]).max() > 0
    again = engine.synthesize(text, VOICE, options)
    np.testing.assert_array_equal(again.audio, audio)  # same seed, same audio
    assert again.sentences == 1


def test_engine_streams_chunks_that_the_stream_decoder_gives(engine):
    text = "流式合成的第一句话。"
    options = SynthesisOptions(max_new_tokens=30, seed=21, fragment_interval=0.0, speed=1.0)
    windows = {"first_chunk_tokens": 12, "chunk_tokens": 8}  # default overlap: 16 frames held back
    tokens: list[int] = []
    chunks, tokens_at_chunk = [], []
    for chunk in engine.synthesize_stream(text, VOICE, options, streaming=True, on_token=tokens.append, **windows):
        chunks.append(chunk)
        tokens_at_chunk.append(len(tokens))
    assert len(tokens) == 30 and tokens_at_chunk == [12, 20, 28, 30]  # audio before the GPT finished
    assert [c.chunk_index for c in chunks] == [0, 1, 2, 3]
    assert [c.is_final for c in chunks] == [False, False, False, True]
    streamed = np.concatenate([c.audio for c in chunks])
    assert streamed.size == engine.synthesize(text, VOICE, options).audio.size == expected_samples(30, 1.0)
    voice = engine.registry.get(VOICE)
    _, sovits = engine.voice_models(voice)
    (sentence,) = engine.phone_sentences(text, "zh")
    dec = SoVITSStreamDecoder(sovits, sentence.phone_ids, ge=engine.prepare_voice(voice).style, speed=1.0,
                              noise_scale=options.noise_scale, seed=options.seed, first_chunk_codes=12,
                              chunk_codes=8)
    reference = np.concatenate([dec.feed(t) for t in tokens] + [dec.finish()])
    np.testing.assert_array_equal(streamed, reference)  # the engine adds nothing to the stream decoder


def test_the_first_window_follows_the_device_default(engine, monkeypatch):
    from dora_primespeech_mlx.models import sovits_stream

    assert engine.first_chunk_tokens == (sovits_stream.FIRST_CHUNK_CODES_CUDA if ON_CUDA
                                         else sovits_stream.FIRST_CHUNK_CODES)
    monkeypatch.setattr(engine, "first_chunk_tokens", 12)  # what a CUDA engine does with its 15
    tokens: list[int] = []
    options = SynthesisOptions(max_new_tokens=30, seed=21, fragment_interval=0.0, speed=1.0)
    first = next(iter(engine.synthesize_stream("流式合成的第一句话。", VOICE, options, streaming=True,
                                               on_token=tokens.append, chunk_tokens=8)))
    assert len(tokens) == 12 and first.audio.size == 8 * 640  # 2 x 12 frames, 16 held back


def test_engine_splits_sentences(engine):
    result = engine.synthesize("第一句话。Second sentence here.", VOICE,
                               SynthesisOptions(max_new_tokens=3, seed=1, fragment_interval=0.0, text_lang="auto"))
    assert result.sentences == 2 and result.audio.size == 2 * expected_samples(3, 1.1)


def test_whole_text_batches_its_sentences_and_sounds_as_one_by_one(engine):
    # three sentences decoded two at a time (the third joins when one stops) give each sentence the
    # audio of the sentence-by-sentence loop; chunks leave in sentence order, the last one final
    text = "第一句话。第二句话比较长一点。Third one is English."
    options = SynthesisOptions(max_new_tokens=20, seed=5, fragment_interval=0.05, text_lang="auto")
    engine.batch_rows = 2
    try:
        batched = list(engine.synthesize_stream(text, VOICE, options, streaming=False))
        engine.batch_rows = 1
        single = list(engine.synthesize_stream(text, VOICE, options, streaming=False))
    finally:
        engine.batch_rows = 8
    assert [c.sentence_index for c in batched] == [0, 1, 2] and [c.is_final for c in batched] == [False, False, True]
    assert len(single) == 3 and [c.timings["batch_rows"] for c in batched] == [2.0] * 3
    assert "batch_rows" not in single[0].timings
    assert [c.timings["tokens"] for c in batched] == [c.timings["tokens"] for c in single]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.audio, s.audio, atol=1e-4)
    cancelled = iter([False, False, True])
    with pytest.raises(SynthesisCancelled):
        list(engine.synthesize_stream(text, VOICE, options, streaming=False,
                                      is_cancelled=lambda: next(cancelled, True)))


def test_cli_bench_json_is_one_line_with_what_to_share(tiny_dir, capsys):
    from dora_primespeech_mlx.cli import main

    rc = main(["bench", "--text", "你好。", "--model-dir", str(tiny_dir), "--max-tokens", "3", "--json",
               "--decode-tokens", "6", "--precisions", "fp32", "fp16"])
    out = capsys.readouterr().out.strip()
    assert rc == 0 and "\n" not in out  # one JSON line, the thing to share
    report = json.loads(out)
    assert report["voice"] == VOICE and report["prepare_voice_s"] >= 0
    assert report["machine"]["mlx"] == mx.__version__ and report["machine"]["chip"] and report["machine"]["device"]
    for key in ("decode_ms_per_token_fp32_eager", "decode_ms_per_token_fp32_compiled", "decode_ms_per_token_fp16_eager",
                "decode_ms_per_token_fp16_compiled", "batch_tokens_per_s_1_rows", "batch_tokens_per_s_8_rows",
                "first_audio_ms", "rtf"):
        assert report[key] > 0, key
    # the fused kernels need CUDA and head_dim 32 (the tiny GPT's is smaller)
    fused = mx.default_device().type == mx.gpu and mx.cuda.is_available() and \
        tiny_models.GPT_HIDDEN // tiny_models.GPT_HEADS == 32
    assert report["decode_path_fp32"] in (("persistent-kernel", "fused-kernels") if fused else ("mlx-ops",))
    assert 0 < report["first_audio_ms"] / 1000 <= report["streamed_total_s"]


# ------------------------------------------------------------------------------- broken files


def test_gpt_config_that_does_not_match_its_weights_names_the_file(tmp_path):
    weights = smoke.materialize(smoke.gpt_params(tiny_models.tiny_gpt_config()), np.random.default_rng(0))
    config = tiny_models.tiny_gpt_config()
    config["model"]["n_layer"] = 3  # the file holds 2 layers
    bad = write_torch_file(tmp_path / "liar.ckpt", collections.OrderedDict(weight=weights, config=config))
    with pytest.raises(CheckpointError, match=r"liar\.ckpt.*h\.layers\.2\.linear1\.weight"):
        load_t2s(bad)


def test_sovits_config_that_does_not_match_its_weights_names_the_file(tmp_path):
    weights = dict(smoke.materialize(smoke.sovits_params(tiny_models.tiny_sovits_config()), np.random.default_rng(0)))
    config = tiny_models.tiny_sovits_config()
    config["model"]["hidden_channels"] = 48
    bad = write_torch_file(tmp_path / "liar.pth",
                           collections.OrderedDict(weight=weights, config=smoke.as_hparams(config)))
    with pytest.raises(CheckpointError, match=r"liar\.pth.*does not match"):
        load_sovits(bad)


@pytest.mark.parametrize("encoder, key, value", [("hubert", "num_hidden_layers", 3),
                                                 ("bert", "hidden_size", 512)])
def test_encoder_config_that_does_not_match_its_weights_names_the_folder(paths, tmp_path, encoder, key, value):
    folder = tmp_path / paths[encoder].name
    shutil.copytree(paths[encoder], folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    loader = load_hubert if encoder == "hubert" else load_bert
    with pytest.raises(CheckpointError, match=str(folder)):
        loader(folder)
