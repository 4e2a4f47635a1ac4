"""End-to-end synthesis through the engine on the oracle-built model directory (random weights).

Token caps keep these short on mlx-cpu; a random GPT almost never emits EOS.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dora_primespeech_mlx.weights import CheckpointError
from dora_primespeech_mlx.engine import Engine, SynthesisCancelled, length_guard
from dora_primespeech_mlx.models.sovits_stream import SoVITSStreamDecoder
from dora_primespeech_mlx.options import SynthesisOptions
from dora_primespeech_mlx.voices import VoiceRegistry

HOP = 640


@pytest.fixture(scope="session")
def all_voices_dir(fixtures, tmp_path_factory):
    """The oracle model dir laid out for every built-in voice id (links to the one smoke voice)."""
    root = tmp_path_factory.mktemp("models")
    moyoyo = root / "moyoyo"
    src = fixtures.moyoyo
    moyoyo.mkdir()
    for name in ("chinese-hubert-base", "chinese-roberta-wwm-ext-large"):
        os.symlink(src / name, moyoyo / name)
    registry = VoiceRegistry(root)
    for vid in registry.ids():
        v = registry.get(vid)
        for dst, origin in ((v.gpt_weights, fixtures.gpt_path), (v.sovits_weights, fixtures.sovits_path),
                            (v.reference_audio, fixtures.ref_wav)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(origin, dst)
    return root


@pytest.fixture(scope="session")
def engine(all_voices_dir):
    return Engine(all_voices_dir)


def expected_samples(tokens: int, speed: float, interval: float) -> int:
    frames = 2 * tokens if speed == 1.0 else int(2 * tokens / speed) + 1
    return frames * HOP + int(round(interval * 32000))


def test_every_builtin_voice_resolves(all_voices_dir):
    registry = VoiceRegistry(all_voices_dir)
    assert len(registry.ids()) == 15
    for vid in registry.ids():
        assert registry.get(vid).missing_files() == [], vid


def test_prepare_voice_once(engine):
    voice = engine.registry.get("Doubao")
    prompt = engine.prepare_voice(voice)
    assert prompt.prompt_codes.ndim == 1 and prompt.prompt_codes.size > 50
    assert prompt.refer_spec.shape[0] == 1025 and prompt.style.shape == (512,)
    assert prompt.prompt_bert.shape == (1024, prompt.prompt_phone_ids.size)
    # the transcript mixes Chinese (BERT features) and English (zeros)
    zero_cols = np.all(prompt.prompt_bert == 0, axis=0)
    assert zero_cols.any() and not zero_cols.all()
    assert engine.prepare_voice(voice) is prompt


def test_prepared_voices_are_bounded_least_recently_used_first(engine, monkeypatch):
    """VOICE:CUSTOM makes a new prepared voice per clip and transcript: the engine keeps MAX_PROMPTS."""
    from dataclasses import replace

    import dora_primespeech_mlx.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_PROMPTS", 2)
    base = engine.registry.get("Doubao")
    voices = [replace(base, prompt_text=f"你好{n}。") for n in range(3)]
    first, second = engine.prepare_voice(voices[0]), engine.prepare_voice(voices[1])
    assert engine.prepare_voice(voices[0]) is first  # used again: now the most recent
    engine.prepare_voice(voices[2])  # drops voices[1], the least recently used
    assert len(engine._prompts) == 2
    assert engine.prepare_voice(voices[0]) is first and engine.prepare_voice(voices[1]) is not second


@pytest.mark.parametrize("text, lang, n_sentences", [
    ("你好，世界。", "zh", 1),
    ("Hello there my good friend.", "en", 1),
    ("我们去 park 散步吧。", "auto", 1),
])
def test_audio_length_matches_generated_tokens(engine, text, lang, n_sentences):
    options = SynthesisOptions(max_new_tokens=6, seed=7, text_lang=lang, fragment_interval=0.1)
    chunks = list(engine.synthesize_stream(text, "Doubao", options))
    assert len(chunks) == n_sentences and chunks[-1].is_final
    for chunk in chunks:
        tokens = int(chunk.timings["tokens"])
        assert 1 <= tokens <= 6
        assert chunk.audio.dtype == np.float32 and np.isfinite(chunk.audio).all()
        assert chunk.audio.size == expected_samples(tokens, 1.1, 0.1)  # Doubao speaks at 1.1
        assert np.abs(chunk.audio).max() <= 1.0
        assert np.abs(chunk.audio[:-3200]).max() > 0  # not silence


def test_deterministic_with_a_seed_and_speed_from_options(engine):
    options = SynthesisOptions(max_new_tokens=5, seed=11, speed=1.0, fragment_interval=0.0)
    a = engine.synthesize("一二三四五。", "BYS", options)
    b = engine.synthesize("一二三四五。", "BYS", options)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert a.audio.size == expected_samples(int(a.timings["tokens"]), 1.0, 0.0)
    assert a.timings["t2s_s"] > 0 and a.timings["sovits_s"] > 0 and a.timings["rtf"] > 0


def test_sentences_are_split(engine):
    result = engine.synthesize("第一句话在这里。第二句话也在这里。", "Doubao",
                               SynthesisOptions(max_new_tokens=3, seed=1, fragment_interval=0.0))
    assert result.sentences == 2


def test_nothing_to_speak_is_a_clear_error(engine):
    with pytest.raises(ValueError):
        list(engine.synthesize_stream("。。。", "Doubao", SynthesisOptions(max_new_tokens=3)))


def test_cancel_stops_generation(engine):
    options = SynthesisOptions(max_new_tokens=200, seed=3)
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 3:
            engine.cancel()

    with pytest.raises(SynthesisCancelled):
        list(engine.synthesize_stream("取消这一句话的合成。", "Doubao", options, on_token=on_token))
    assert len(seen) == 3


def test_length_guard():
    assert length_guard(10, None, 10.0) == 100
    assert length_guard(2, None, 10.0) == 75
    assert length_guard(500, None, 10.0) == 1500
    assert length_guard(50, 20, 10.0) == 20


def test_missing_and_corrupt_files_name_the_file(fixtures, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(fixtures.moyoyo, root / "moyoyo", symlinks=True,
                    ignore=shutil.ignore_patterns("GPT_weights"))
    engine = Engine(root)
    with pytest.raises(FileNotFoundError, match="doubao-mixed.ckpt"):
        engine.synthesize("你好。", "Doubao", SynthesisOptions(max_new_tokens=2))
    (root / "moyoyo" / "GPT_weights").mkdir()
    (root / "moyoyo" / "GPT_weights" / "doubao-mixed.ckpt").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CheckpointError, match="doubao-mixed.ckpt"):
        Engine(root).synthesize("你好。", "Doubao", SynthesisOptions(max_new_tokens=2))


def test_cli_synthesize_writes_a_wav(all_voices_dir, tmp_path, capsys):
    import soundfile as sf

    from dora_primespeech_mlx.cli import main

    out = tmp_path / "hello.wav"
    rc = main(["synthesize", "你好，世界。", "--voice", "Doubao", "--model-dir", str(all_voices_dir),
               "--out", str(out), "--max-tokens", "4", "--seed", "5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 32000 and audio.size == round(summary["audio_s"] * 32000)
    assert summary["tokens"] <= 4 and summary["rtf"] > 0


def test_cli_synthesize_stream_reports_chunks(all_voices_dir, tmp_path, capsys):
    from dora_primespeech_mlx.cli import main

    out = tmp_path / "stream.wav"
    rc = main(["synthesize", "--text", "你好。", "--model-dir", str(all_voices_dir), "--out", str(out),
               "--max-tokens", "4", "--stream"])
    captured = capsys.readouterr()
    assert rc == 0 and "chunk 0:" in captured.err and "(final)" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert 0 < summary["first_chunk_s"] <= summary["total_s"]


def test_streaming_starts_before_generation_ends_and_matches_whole(engine):
    # default windows (first after 25 tokens), as tests/test_sovits_stream.py measured them
    options = SynthesisOptions(max_new_tokens=40, seed=21, fragment_interval=0.0, speed=1.0)
    tokens_seen = []
    chunks, tokens_at_chunk = [], []
    for chunk in engine.synthesize_stream("流式合成的第一句话。", "Doubao", options, streaming=True,
                                          on_token=tokens_seen.append):
        chunks.append(chunk)
        tokens_at_chunk.append(len(tokens_seen))
    assert len(chunks) == 2 and tokens_at_chunk[0] == 25  # audio before the GPT finished
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert [c.is_final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0].timings["elapsed_s"] < chunks[-1].timings["elapsed_s"]
    streamed = np.concatenate([c.audio for c in chunks])
    whole = engine.synthesize("流式合成的第一句话。", "Doubao", options).audio
    assert streamed.size == whole.size == 2 * len(tokens_seen) * HOP
    # The engine adds nothing to the windowed decoder: its chunks are exactly what the stream decoder
    # gives for the same tokens (whose distance to the whole decode is bounded in test_sovits_stream.py).
    voice = engine.registry.get("Doubao")
    _, sovits = engine.voice_models(voice)
    (sentence,) = engine.phone_sentences("流式合成的第一句话。", "zh")
    decoder = SoVITSStreamDecoder(sovits, sentence.phone_ids, ge=engine.prepare_voice(voice).style, speed=1.0,
                                  noise_scale=options.noise_scale, seed=options.seed)
    reference = np.concatenate([decoder.feed(t) for t in tokens_seen] + [decoder.finish()])
    np.testing.assert_array_equal(streamed, reference)
    assert not np.array_equal(streamed, whole)  # the windows really ran


def test_cancel_from_another_thread_returns_promptly(engine):
    import threading
    import time

    options = SynthesisOptions(max_new_tokens=300, seed=5)
    stream = engine.synthesize_stream("很长的一句话需要很久才能说完。", "Doubao", options)
    timer = threading.Timer(2.0, engine.cancel)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(SynthesisCancelled):
        list(stream)
    assert time.perf_counter() - t0 < 60  # 300 tokens would take minutes on mlx-cpu


# ---------------------------------------------------------------- one MLX owner thread (threading rule)


def _run_in_thread(fn, name="other-thread"):
    import threading

    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, name=name)
    t.start()
    t.join(600)
    return box


def test_mlx_methods_refuse_a_thread_other_than_the_owner(engine):
    """On a GPU, MLX work off the thread that compiled it fails ("There is no Stream(gpu, 0) in current
    thread"); on the CPU it silently works, so the engine checks the thread itself, everywhere."""
    from dora_primespeech_mlx.engine import WrongThreadError

    voice = engine.registry.get("Doubao")
    calls = {
        "synthesize": lambda: engine.synthesize("你好。", voice, SynthesisOptions(max_new_tokens=2)),
        "synthesize_stream": lambda: next(engine.synthesize_stream("你好。", voice)),
        "prepare_voice": lambda: engine.prepare_voice(voice),
        "warm_up": lambda: engine.warm_up(voice),
        "voice_models": lambda: engine.voice_models(voice),
        "phone_sentences": lambda: engine.phone_sentences("你好。", "zh"),
        "bert": engine.bert,
    }
    for name, call in calls.items():
        box = _run_in_thread(call, name="intruder")
        assert isinstance(box.get("error"), WrongThreadError), name
        assert name in str(box["error"]) and "intruder" in str(box["error"]) and "MainThread" in str(box["error"])
    # cancel is a plain flag: any thread
    assert "error" not in _run_in_thread(engine.cancel)
    # and the owner still works afterwards
    assert engine.synthesize("你好。", voice, SynthesisOptions(max_new_tokens=2)).audio.size > 0


def test_an_engine_built_on_a_worker_thread_serves_there(all_voices_dir):
    def life():
        e = Engine(all_voices_dir)
        voice = e.registry.get("Doubao")
        e.prepare_voice(voice)
        e.warm_up(voice)
        return e, e.synthesize("你好。", voice, SynthesisOptions(max_new_tokens=2))

    box = _run_in_thread(life, name="mlx-owner")
    assert "error" not in box, box.get("error")
    built, result = box["result"]
    assert built.owner_thread.name == "mlx-owner" and result.audio.size > 0
    from dora_primespeech_mlx.engine import WrongThreadError

    with pytest.raises(WrongThreadError, match="mlx-owner"):
        built.synthesize("你好。", "Doubao", SynthesisOptions(max_new_tokens=2))


def test_warm_up_uses_the_request_settings_speed_buckets_and_cache_blocks(engine, monkeypatch):
    """What warm-up prepares on a GPU, checked on the CPU by forcing the GPU defaults on: the compiled
    step for the configured sampling settings up to the blocks a typical sentence reaches, and the
    SoVITS buckets a stream window at the voice's speed needs (speed < 1: more than one 160-frame
    bucket), the window's bucket last; then one typical request with the same options."""
    from dora_primespeech_mlx.models.sovits_stream import max_window_frames

    voice = engine.registry.get("Doubao")
    t2s, sovits = engine.voice_models(voice)
    prompt = engine.prepare_voice(voice)
    seen = {}
    monkeypatch.setattr(t2s, "compile_decode", True)
    monkeypatch.setattr(sovits, "bucket_frames", 160)
    monkeypatch.setattr(t2s, "warm_up_compiled", lambda n, **kw: seen.update(t2s=(n, kw)) or 0.0)
    monkeypatch.setattr(sovits, "warm_up_buckets", lambda n, last=None: seen.update(sovits=(n, last)) or 0.0)
    monkeypatch.setattr(engine, "synthesize_stream",
                        lambda text, v, options, **kw: seen.update(synth=(options, kw)) or iter(()))
    options = SynthesisOptions(top_k=3, top_p=0.9, temperature=0.7, repetition_penalty=1.2, speed=0.8,
                               max_new_tokens=200)
    engine.warm_up(voice, options, streaming=True)
    n, kw = seen["t2s"]
    assert kw == {"top_k": 3, "top_p": 0.9, "temperature": 0.7, "repetition_penalty": 1.2}
    assert n % 256 == 0 and n > prompt.prompt_codes.size + prompt.prompt_phone_ids.size + 64 + 200
    max_frames, last = seen["sovits"]
    assert last == max_window_frames(25, 50, 0.8) > 160  # speed 0.8 stretches a window past one bucket
    assert max_frames == max(int(2 * 200 / 0.8) + 1, last)
    synth_options, synth_kw = seen["synth"]
    assert synth_options.top_k == 3 and synth_options.max_new_tokens == 200 and synth_kw["streaming"] is True


# ------------------------------------------------------------------------------------ hostile text


def test_a_sentence_that_cannot_be_spoken_is_skipped_and_the_rest_spoken(engine):
    """Kana in one sentence used to fail the whole text; now that sentence is skipped with a note on
    the chunks and the others are spoken."""
    options = SynthesisOptions(max_new_tokens=2, seed=1, fragment_interval=0.0)
    chunks = list(engine.synthesize_stream("第一句话。ひらがなの文です。第三句话。", "Doubao", options, streaming=False))
    assert len(chunks) == 2 and chunks[-1].is_final
    notes = [n for c in chunks for n in c.notes]
    assert len(notes) == 1 and "skipped" in notes[0] and "kana" in notes[0].lower()


def test_only_unspeakable_text_is_nothing_to_speak(engine):
    from dora_primespeech_mlx.options import NothingToSpeak

    for text in ("😀😀🎉", "ひらがなです。", "。。。"):
        with pytest.raises(NothingToSpeak):
            list(engine.synthesize_stream(text, "Doubao", SynthesisOptions(max_new_tokens=2)))


def test_long_digit_runs_are_cut_and_stay_fast():
    """A run of thousands of digits made the English normaliser run for minutes (quadratic regexes,
    then a number too large to read); pieces are now cut to MAX_PIECE_CHARS first."""
    import time

    from dora_primespeech_mlx.text.frontend import request_sentences

    for lang in ("en", "zh"):
        t0 = time.perf_counter()
        sentences = []
        notes: list[str] = []
        for sentence in request_sentences("1" * 5000, lang, notes=notes):
            sentences.append(sentence)
        assert time.perf_counter() - t0 < 20, lang  # was 83 s for 3000 digits in English
        assert any("cut" in n for n in notes)
        assert all(len(s.text) <= 100 for s in sentences)


def test_cut_long_piece_prefers_spaces_and_commas():
    from dora_primespeech_mlx.text.segment import cut_long_piece

    words = " ".join(["word"] * 60)
    parts = cut_long_piece(words, 100)
    assert "".join(parts) == words and all(len(p) <= 100 for p in parts)
    assert all(p.endswith(" ") for p in parts[:-1])
    assert cut_long_piece("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
    assert cut_long_piece("短句", 100) == ["短句"]


def test_non_finite_reference_and_overlong_reference_are_refused_before_use(tmp_path):
    import soundfile as sf

    from dora_primespeech_mlx.audio import load_reference_audio

    wav = np.zeros(32000 * 4, np.float32)
    wav[100] = np.nan
    sf.write(tmp_path / "nan.wav", wav, 32000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        load_reference_audio(tmp_path / "nan.wav")
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 30, np.float32), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match="30.0 s"):
        load_reference_audio(tmp_path / "long.wav")


def test_non_finite_audio_is_an_error_naming_its_source(engine):
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine._chunk(np.array([0.0, np.inf], np.float32), 0, 0, True, {}, 0.0)


def test_warm_up_loads_the_text_frontends_except_under_the_low_memory_preset(engine, monkeypatch):
    """For a voice whose transcript has no English, the first text with an English word loaded CMUdict,
    wordsegment and the OOV model inside the request (0.6 s on a 2-core CPU); warm-up loads them on
    every device, but not under MEMORY_PRESET=low, which keeps the ~160 MB for users who need it."""
    voice = engine.registry.get("Doubao")
    calls = []
    monkeypatch.setattr("dora_primespeech_mlx.engine.warm_up_frontend", lambda: calls.append(1))
    spent = engine.warm_up(voice)
    assert calls == [1] and "frontend_s" in spent
    monkeypatch.setattr(engine, "memory_preset", "low")
    assert engine.warm_up(voice)["frontend_s"] == 0.0 and calls == [1]
