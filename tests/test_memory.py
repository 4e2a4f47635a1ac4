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
    assert mx.get_active_memory() < resident + hubert_bytes / 4
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
