"""The fused single-row decode step (models/decode_kernels.py): five custom kernels per layer, K/V
written in place. The kernels run on CUDA only (the NVIDIA GPU host); on the CPU these tests check
the switch logic, the generated sources and that decoding never asks for the kernels."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dora_primespeech_mlx.models import decode_kernels as dk
from dora_primespeech_mlx.models.cache import COMPILE_BLOCK
from dora_primespeech_mlx.models.t2s import T2SConfig
from dora_primespeech_mlx.models.t2s_generate import T2S
from dora_primespeech_mlx.models.t2s_precision import apply_precision

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
from decode_gpt import ON_CUDA, decode_inputs, head_dim32_gpt  # noqa: E402

pytestmark = pytest.mark.fast
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="the fused decode kernels run on CUDA (the NVIDIA GPU host)")


def gpt(hidden: int = 128, heads: int = 4, layers: int = 3, seed: int = 0) -> T2S:
    return head_dim32_gpt(hidden, heads, layers, seed)


inputs = decode_inputs


def test_every_variant_names_only_its_inputs_and_writes_kv_only_in_qkv():
    for variant in dk._VARIANTS:
        names, body = dk.kernel_source(variant, 1e-5)
        for name in ("gx", "bx", "r", "gr", "br", "kc", "vc", "offset"):
            assert bool(re.search(rf"\b{name}\b", body)) == (name in names), (variant, name)
        assert ("const_cast" in body) == variant.startswith("qkv")
    assert "1e-05f" in dk.kernel_source("ffn1", 1e-5)[1]  # the config's eps, as a float literal


def test_the_switch_and_the_model_checks(monkeypatch):
    model = gpt()
    monkeypatch.setenv(dk.ENV_SWITCH, "0")
    assert dk._supported(model) == f"{dk.ENV_SWITCH}=0"
    assert not dk.fused_decode_available(model)
    monkeypatch.delenv(dk.ENV_SWITCH)
    if not ON_CUDA:
        assert dk._supported(model) == "not a CUDA GPU"
    nn.quantize(model.h, group_size=64, bits=8)  # what PRECISION=int8 does to the layers
    assert dk._supported(model) in ("not a CUDA GPU", "quantised weights")
    odd = T2S(T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=128, hidden_dim=128, head=2,
                        n_layer=1, bert_dim=16))
    assert dk._supported(odd) in ("not a CUDA GPU", "head_dim 64 (the attention kernel is for 32)")


def test_decoding_off_cuda_never_asks_for_the_kernels(monkeypatch):
    if ON_CUDA:
        pytest.skip("on CUDA the kernels are allowed")

    def refuse(*args, **kwargs):
        raise AssertionError("the fused decode kernels were called off CUDA")

    monkeypatch.setattr("dora_primespeech_mlx.models.t2s_generate.fused_decode_logits", refuse)
    model = gpt()
    model.compile_decode = True
    assert len(model.generate(*inputs(), top_k=1, max_new_tokens=5)) == 5


@needs_cuda
def test_self_check_passes_at_fp32_and_fp16():
    assert dk.self_check(gpt())
    assert dk.self_check(apply_precision(gpt(), "fp16"))


@needs_cuda
def test_fused_decode_keeps_greedy_tokens_and_logits_across_a_capacity_block(monkeypatch):
    model = gpt(hidden=512, heads=16, layers=4)
    # 200 cached positions + 120 steps: the K/V buffers are re-fitted past COMPILE_BLOCK mid-decode
    args = inputs(n_text=60, n_prompt=140)
    assert 200 < COMPILE_BLOCK < 200 + 120
    eager = list(model.decode_steps(*args, top_k=1, max_new_tokens=120, with_logits=True, compile=False))
    monkeypatch.setenv(dk.ENV_SWITCH, "0")
    ops = list(model.decode_steps(*args, top_k=1, max_new_tokens=120, with_logits=True, compile=True))
    monkeypatch.delenv(dk.ENV_SWITCH)
    assert dk.fused_decode_available(model)
    calls = []
    real = dk.fused_decode_logits
    monkeypatch.setattr("dora_primespeech_mlx.models.t2s_generate.fused_decode_logits",
                        lambda *a: calls.append(1) or real(*a))
    model._compiled_steps.clear()
    fused = list(model.decode_steps(*args, top_k=1, max_new_tokens=120, with_logits=True, compile=True))
    assert calls, "the compiled step did not trace the fused kernels"
    want = [s.token for s in eager]
    assert [s.token for s in ops] == want
    assert [s.token for s in fused] == want
    d = np.abs(np.stack([s.logits for s in fused]) - np.stack([s.logits for s in eager])).max()
    assert d <= 1e-4, d


@needs_cuda
def test_requests_do_not_share_kv_buffers_and_warm_up_writes_nothing_they_read():
    model = gpt(hidden=256, heads=8, layers=2, seed=1)
    model.compile_decode = True
    a, b = inputs(20, 10, seed=5), inputs(14, 30, seed=6)
    first_a = model.generate(*a, top_k=1, max_new_tokens=60).tolist()
    first_b = model.generate(*b, top_k=1, max_new_tokens=60).tolist()
    model.warm_up_compiled(2 * COMPILE_BLOCK, top_k=1)
    assert model.generate(*a, top_k=1, max_new_tokens=60).tolist() == first_a
    assert model.generate(*b, top_k=1, max_new_tokens=60).tolist() == first_b
    # seeded sampling too: the same seed gives the same tokens, run after run
    s1 = model.generate(*a, top_k=5, seed=7, max_new_tokens=60).tolist()
    assert model.generate(*a, top_k=5, seed=7, max_new_tokens=60).tolist() == s1


@needs_cuda
def test_a_mismatching_kernel_fails_the_self_check_and_decoding_falls_back(monkeypatch, caplog):
    model = gpt()
    real = dk._matvec

    def off_by_a_little(variant, *a):
        out = real(variant, *a)
        return out + 1e-2 if variant == "head" else out

    monkeypatch.setattr(dk, "_matvec", off_by_a_little)
    assert not dk.self_check(model)
    assert "differs from MLX's ops" in caplog.text
    assert not dk.fused_decode_available(model)
    model.compile_decode = True
    assert len(model.generate(*inputs(), top_k=1, max_new_tokens=5)) == 5


@needs_cuda
def test_batched_rows_use_the_kernels_and_keep_each_rows_tokens(monkeypatch):
    model = gpt(hidden=256, heads=8, layers=2, seed=2)
    # different lengths; the last row's cache crosses a capacity block while the others decode
    rows = [inputs(5, 3, seed=1), inputs(12, 0, seed=2), inputs(30, 220, seed=3)]
    model.compile_decode = False
    want = [model.generate(*r, top_k=1, max_new_tokens=40).tolist() for r in rows]  # eager, one by one
    calls = []
    real = dk.fused_decode_logits
    monkeypatch.setattr("dora_primespeech_mlx.models.t2s_batch.fused_decode_logits",
                        lambda model, x, *a: calls.append(x.shape[0]) or real(model, x, *a))
    model.compile_decode = True
    got = [r.tolist() for r in model.generate_batch(rows, top_k=1, max_new_tokens=40)]
    assert 3 in calls, "the batched step did not trace the fused kernels for three rows"
    assert got == want
    # seeded sampling: each row draws what it draws alone in a batch of the MLX ops
    seeded = [r.tolist() for r in model.generate_batch(rows, top_k=5, seed=[1, 2, 3], max_new_tokens=40)]
    monkeypatch.setenv(dk.ENV_SWITCH, "0")
    assert [r.tolist() for r in model.generate_batch(rows, top_k=5, seed=[1, 2, 3], max_new_tokens=40)] == seeded


def _matvec_contract(variant, eps, inputs, n, k, w_dtype, out_dtype, rows):
    """What each kernel variant computes (its contract, with MLX ops), K/V written into the caller's
    buffers in place as the kernel does: a CPU stand-in that checks how `fused_decode_logits` wires
    the variants (norms, residuals, layer 0, head), which the CUDA tests then check for real."""
    names = dk._VARIANTS[variant]
    norm_x, norm_r = "gx" in names, "gr" in names
    a = dict(zip(names, inputs))

    def layer_norm(v, g, b):
        mean = v.mean(-1, keepdims=True)
        var = ((v - mean) ** 2).mean(-1, keepdims=True)
        return (v - mean) * mx.rsqrt(var + eps) * g + b

    x = a["x"].astype(mx.float32).reshape(rows, k)
    if norm_x:
        x = layer_norm(x, a["gx"], a["bx"])
    y = x @ a["w"].astype(mx.float32).T
    if "bias" in a:
        y = y + a["bias"]
    if variant.startswith("qkv"):
        d = n // 3
        kc, vc = a["kc"], a["vc"]
        heads, hd = kc.shape[1], kc.shape[3]
        for b, slot in enumerate(a["offsets"].tolist()):
            kc[b, :, slot, :] = y[b, d:2 * d].reshape(heads, hd).astype(kc.dtype)
            vc[b, :, slot, :] = y[b, 2 * d:].reshape(heads, hd).astype(vc.dtype)
        return y[:, :d].astype(out_dtype)
    if variant == "ffn1":
        return mx.maximum(y, 0).astype(out_dtype)
    if variant == "head":
        return y
    r = a["r"].astype(mx.float32)
    return (y + (layer_norm(r, a["gr"], a["br"]) if norm_r else r)).astype(out_dtype)


def test_the_step_wires_the_kernel_variants_as_the_layer_computes(monkeypatch):
    """On any device: with every kernel replaced by its contract, one fused step (one row; three rows at
    different slots) gives the MLX-op step's logits and K/V — the layer-0 input without a norm, each
    later layer's input normalised by the previous norm2, norm1 between the halves, the head's norm."""
    from dora_primespeech_mlx.models import attention_kernels as ak

    monkeypatch.setattr(dk, "_matvec", _matvec_contract)
    monkeypatch.setattr(dk, "single_query_attention",
                        lambda q, k, v, lengths, scale, warps=None: ak.reference_attention(q, k, v, lengths, scale))
    model = gpt()
    for offsets, capacity in (([37], 64), ([0, 130, 63], 192)):
        err, kv_err = dk._check_rows(model, offsets, capacity)
        assert err < 1e-5 and kv_err < 1e-5, (offsets, err, kv_err)
    # a wrong wiring is caught: the head without its norm
    real = _matvec_contract
    monkeypatch.setattr(dk, "_matvec", lambda v, eps, inputs, *a: real(v, eps, inputs, *a) if v != "head"
                        else real("head", eps, [inputs[0], mx.ones_like(inputs[1]) * 2, inputs[2], inputs[3]], *a))
    assert dk._check_rows(model, [37], 64)[0] > 1e-3
