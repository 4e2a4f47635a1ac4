"""The fused head_dim-32 decode attention (models/attention_kernels.py). Its kernels run on a GPU only
(CUDA on the NVIDIA host, Metal on a Mac); on the CPU these tests check the switch logic and that
decoding never asks for the kernel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dora_primespeech_mlx.models import attention_kernels as ak
from dora_primespeech_mlx.models.t2s import T2SConfig
from dora_primespeech_mlx.models.t2s_generate import T2S

pytestmark = pytest.mark.fast
ON_GPU = ak._backend() is not None


def gpt(hidden: int = 64, heads: int = 2) -> T2S:  # head_dim 32, as the real GPT's 512/16
    mx.random.seed(0)
    cfg = T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=hidden, hidden_dim=hidden, head=heads,
                    n_layer=2, bert_dim=16)
    model = T2S(cfg)
    model.eval()
    return model


def inputs(n_text=9, n_prompt=7):
    rng = np.random.default_rng(3)
    return rng.integers(0, 32, n_text), rng.standard_normal((16, n_text)).astype(np.float32), rng.integers(0, 1024, n_prompt)


def test_the_kernel_is_offered_only_when_switched_on_on_a_gpu_for_head_dim_32(monkeypatch):
    monkeypatch.delenv(ak.ENV_SWITCH, raising=False)
    assert not ak.fused_attention_available(32)  # opt-in
    monkeypatch.setenv(ak.ENV_SWITCH, "1")
    assert not ak.fused_attention_available(64)
    assert ak.fused_attention_available(32) == (ON_GPU and ak.self_check())


def test_reference_attention_masks_each_row_at_its_length():
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in [(2, 3, 1, 32), (2, 3, 10, 32), (2, 3, 10, 32)])
    out = np.array(ak.reference_attention(q, k, v, mx.array([4, 10]), 32 ** -0.5))
    for b, n in enumerate([4, 10]):
        s = np.einsum("hd,htd->ht", np.array(q)[b, :, 0], np.array(k)[b, :, :n]) * 32 ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[b, :, 0], np.einsum("ht,htd->hd", p, np.array(v)[b, :, :n]), atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="the fused kernel runs on a GPU (CUDA on the NVIDIA host, Metal on a Mac)")
def test_kernel_passes_its_self_check_and_decode_keeps_parity():
    assert ak.self_check(mx.float32)
    model = gpt()
    eager = list(model.decode_steps(*inputs(), top_k=1, max_new_tokens=40, with_logits=True, compile=False))
    model.fused_attention = True
    fused = list(model.decode_steps(*inputs(), top_k=1, max_new_tokens=40, with_logits=True, compile=True))
    assert [s.token for s in fused] == [s.token for s in eager]
    d = np.abs(np.stack([s.logits for s in fused]) - np.stack([s.logits for s in eager])).max()
    assert d <= 1e-4, d
    rows = [inputs(5, 3), inputs(12, 0), inputs(8, 20)]
    model.fused_attention, model.compile_decode = False, False
    want = [model.generate(*r, top_k=1, max_new_tokens=30).tolist() for r in rows]
    model.fused_attention, model.compile_decode = True, True
    assert [r.tolist() for r in model.generate_batch(rows, top_k=1, max_new_tokens=30)] == want


def test_decoding_on_the_cpu_never_asks_for_the_kernel(monkeypatch):
    if ON_GPU:
        pytest.skip("on a GPU the kernel is allowed")

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel was called on the CPU")

    monkeypatch.setattr("dora_primespeech_mlx.models.t2s.single_query_attention", refuse)
    model = gpt()
    assert not model.fused_attention
    model.compile_decode = True
    assert len(model.generate(*inputs(), top_k=1, max_new_tokens=5)) == 5
    assert len(model.generate_batch([inputs()], top_k=1, max_new_tokens=5)[0]) == 5
