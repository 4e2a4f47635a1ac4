"""Small random GPTs with the real head_dim (32) and their decode inputs, for the custom decode kernels'
tests (test_decode_kernels, test_decode_persistent)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dora_primespeech_mlx.models.t2s import T2SConfig
from dora_primespeech_mlx.models.t2s_generate import T2S

ON_CUDA = mx.default_device().type == mx.gpu and mx.cuda.is_available()


def head_dim32_gpt(hidden: int = 128, heads: int = 4, layers: int = 3, seed: int = 0) -> T2S:
    """A random-weight T2S with hidden / heads = 32 (as the real 512 / 16), in eval mode."""
    mx.random.seed(seed)
    cfg = T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=hidden, hidden_dim=hidden, head=heads,
                    n_layer=layers, bert_dim=16)
    model = T2S(cfg)
    model.eval()
    return model


def decode_inputs(n_text=9, n_prompt=7, seed=3):
    """(phone_ids, bert (16, n_text), prompt_tokens) for `head_dim32_gpt`."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 32, n_text), rng.standard_normal((16, n_text)).astype(np.float32),
            rng.integers(0, 1024, n_prompt))
