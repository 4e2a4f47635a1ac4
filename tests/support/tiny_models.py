"""Tiny random-weight models in the real on-disk formats, for the fast test tier (`pytest -m fast`).

The smoke voice's configs (dora_primespeech_mlx/smoke.py) shrunk to a few layers and channels, written
with the same torch-free writers and parameter tables, under the built-in Doubao voice's file names.
Sizes the code fixes stay real: the GPT's `bert_dim` and RoBERTa's hidden size are the engine's
BERT_DIM (1024); the style vector and MRTE have 512 channels; the GPT vocabulary covers the 1024-code
codebook plus EOS; the phone table has the 732 v2 symbols; the vocoder upsamples 640x. HuBERT's
hidden size and SoVITS's `ssl_dim` shrink together.
"""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path

import numpy as np

from dora_primespeech_mlx import smoke
from dora_primespeech_mlx.voices import BUILTIN_FILE, CUSTOM_BASE_VOICE, _entries, _voice_from_entry, read_json_file
from dora_primespeech_mlx.weights.writer import write_hf_folder, write_torch_file, write_wordpiece_tokenizer

GPT_LAYERS, GPT_HIDDEN, GPT_HEADS = 2, 64, 4
SSL_DIM = 64  # HuBERT's hidden size = SoVITS's ssl_dim
BERT_VOCAB = 1200  # specials, ASCII and the first ~1000 CJK ideographs; other characters are [UNK]
REFERENCE_SECONDS = 3.2  # the engine accepts 3-10 s references


def tiny_gpt_config() -> dict:
    cfg = smoke.gpt_config()
    cfg["model"].update(embedding_dim=GPT_HIDDEN, hidden_dim=GPT_HIDDEN, head=GPT_HEADS,
                        linear_units=4 * GPT_HIDDEN, n_layer=GPT_LAYERS)
    return cfg


def tiny_sovits_config() -> dict:
    cfg = smoke.sovits_config()
    # gin stays 512 (MRTE adds ge to its 512 channels); ssl_dim is HuBERT's hidden size
    cfg["model"].update(inter_channels=32, hidden_channels=32, filter_channels=64, n_layers=2,
                        upsample_initial_channel=32, ssl_dim=SSL_DIM)
    return cfg


def tiny_hubert_config() -> dict:
    cfg = smoke.hubert_config()
    cfg.update(conv_dim=[32] * 7, hidden_size=SSL_DIM, num_attention_heads=4, intermediate_size=128,
               num_hidden_layers=2, num_conv_pos_embeddings=16)
    return cfg


def tiny_bert_config() -> dict:
    cfg = smoke.bert_config()
    # 3 layers: the phone features are hidden_states[-3], so one encoder layer runs before them
    cfg.update(vocab_size=BERT_VOCAB, num_hidden_layers=3, intermediate_size=64, max_position_embeddings=256)
    return cfg


def build_tiny_model_dir(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a `$PRIMESPEECH_MODEL_DIR` at `out` whose Doubao voice and encoders are tiny; return it."""
    out = Path(out)
    moyoyo = out / "moyoyo"
    data, problem = read_json_file(BUILTIN_FILE)
    assert not problem, problem
    voices = {v.id: v for v in (_voice_from_entry(e, moyoyo, str(BUILTIN_FILE)) for e in _entries(data))}
    voice = voices[CUSTOM_BASE_VOICE]
    seeds = np.random.SeedSequence(seed).spawn(5)
    gpt = tiny_gpt_config()
    write_torch_file(voice.gpt_weights, collections.OrderedDict(
        weight=smoke.materialize(smoke.gpt_params(gpt), np.random.default_rng(seeds[0])), config=gpt,
        info="GPT-tiny"), archive_name=smoke.ARCHIVE_STEM)
    sov = tiny_sovits_config()
    write_torch_file(voice.sovits_weights, collections.OrderedDict(
        weight=dict(smoke.materialize(smoke.sovits_params(sov), np.random.default_rng(seeds[1]))),
        config=smoke.as_hparams(sov), info="tiny"), archive_name=smoke.ARCHIVE_STEM)
    hub = tiny_hubert_config()
    write_hf_folder(moyoyo / "chinese-hubert-base", hub,
                    smoke.materialize(smoke.hubert_params(hub), np.random.default_rng(seeds[2])),
                    extra_files={"preprocessor_config.json": smoke.HUBERT_PREPROCESSOR})
    bert = tiny_bert_config()
    bert_dir = moyoyo / "chinese-roberta-wwm-ext-large"
    write_hf_folder(bert_dir, bert, smoke.materialize(smoke.bert_params(bert), np.random.default_rng(seeds[3])))
    write_wordpiece_tokenizer(bert_dir, smoke.smoke_vocab(BERT_VOCAB))
    smoke.write_wav_pcm16(voice.reference_audio,
                          smoke.synthetic_reference(REFERENCE_SECONDS, 32000, np.random.default_rng(seeds[4])), 32000)
    return out


@contextlib.contextmanager
def private_tiny_dir(tmp_path_factory, name: str):
    """A tiny model dir whose conversions go to a private cache (not the user's), for a module fixture;
    afterwards the cache setting and the G2PW state that an `Engine` sets process-wide are put back."""
    from dora_primespeech_mlx.constants import CACHE_ENV
    from dora_primespeech_mlx.text import chinese, g2pw

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp(f"{name}-cache"))
    resolver, status = chinese._polyphones, g2pw._status
    try:
        yield build_tiny_model_dir(tmp_path_factory.mktemp(f"{name}-tiny") / "models")
    finally:
        chinese._polyphones, g2pw._status = resolver, status
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old
