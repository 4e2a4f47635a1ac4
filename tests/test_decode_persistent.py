"""The whole decode step as one persistent CUDA kernel (models/decode_persistent.py). The kernel runs
on CUDA only (the NVIDIA GPU host). On the CPU these tests check the generated source, which path a
step takes, and — with the kernel replaced by its contract — how the step wires the model's arrays
into the kernel's inputs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dora_primespeech_mlx.models import attention_kernels as ak
from dora_primespeech_mlx.models import decode_kernels as dk
from dora_primespeech_mlx.models import decode_persistent as dp
from dora_primespeech_mlx.models.cache import COMPILE_BLOCK
from dora_primespeech_mlx.models.t2s import T2SConfig
from dora_primespeech_mlx.models.t2s_generate import T2S
from dora_primespeech_mlx.models.t2s_precision import apply_precision

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
from decode_gpt import ON_CUDA, decode_inputs, head_dim32_gpt  # noqa: E402

pytestmark = pytest.mark.fast
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="the persistent decode kernel runs on CUDA (the NVIDIA GPU host)")


def gpt(hidden: int = 256, heads: int = 8, layers: int = 3, seed: int = 0) -> T2S:
    return head_dim32_gpt(hidden, heads, layers, seed)


inputs = decode_inputs


def test_the_source_calls_each_layer_with_its_own_arrays_and_the_previous_norm():
    names, body = dp.persistent_source(3, 1e-5, 0.125)
    assert names == dp.input_names(3) and len(set(names)) == len(names)
    for name in names:  # every input is used, under its own name
        assert re.search(rf"\b{name}\b", body), name
    calls = re.findall(r"dpm_layer<T, B, D, F>\(w, ([^;]*)\);", body)
    assert len(calls) == 3
    per_layer = [n for n in dp._LAYER_INPUTS if n not in ("g2", "be2")]
    for i, call in enumerate(calls):
        args = [a.strip() for a in call.split(",")]
        source, norm = args[0], args[1:3]
        assert source == ("x" if i == 0 else "w.s")
        assert norm == (["nullptr", "nullptr"] if i == 0 else [f"g2_{i - 1}", f"be2_{i - 1}"])
        assert args[3:-2] == [f"{n}_{i}" for n in per_layer]
        assert args[-2:] == ["1e-05f", "0.125f"]  # the config's eps and the attention scale, as literals
    assert "dpm_head<T, B, D, V>(w, g2_2, be2_2, whead, logits, 1e-05f);" in body
    # the layer function takes its arrays in the order the calls pass them
    signature = re.search(r"void dpm_layer\(DpmWork& w, const float\* s_in, const float\* gp, const float\* bp,(.*?)\)",
                          dp._HEADER, re.DOTALL).group(1)
    params = [p.split()[-1].replace("*", "") for p in signature.split(",")][:len(per_layer)]
    assert [p.replace("b1n", "be1").replace("_in", "") for p in params] == per_layer


def test_which_path_a_step_takes(monkeypatch):
    model = gpt()
    checked = []
    monkeypatch.setattr(dk, "_supported", lambda m: None)
    monkeypatch.setattr(dk, "self_check", lambda m, tol=1e-4, mode="kernels": checked.append(mode) or True)
    assert dk.fused_decode_mode(model) == "persistent"
    assert checked == ["kernels", "persistent"]
    assert dk.fused_decode_mode(model, dp.MAX_ROWS) == "persistent"
    assert dk.fused_decode_mode(model, dp.MAX_ROWS + 1) == "kernels"  # more rows than the kernel takes
    assert len(checked) == 2  # decided once per model, switch, device and precision
    monkeypatch.setenv(dk.ENV_SWITCH, "kernels")
    assert dk.fused_decode_mode(model) == "kernels"
    monkeypatch.setenv(dk.ENV_SWITCH, "1")
    model.__dict__.pop("_fused_decode_checked")
    monkeypatch.setattr(dk, "self_check", lambda m, tol=1e-4, mode="kernels": mode == "kernels")
    assert dk.fused_decode_mode(model) == "kernels"  # the persistent kernel failed its check
    assert dp.supported_shape(model.config, 1) is None
    big = T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=96, hidden_dim=96, head=3, n_layer=40,
                    bert_dim=16)
    assert "layers" in dp.supported_shape(big, 1)


def _contract(n_layer: int, eps: float):
    """What the kernel computes, with MLX ops over its named inputs (K/V written into the caller's
    buffers in place as the kernel does): a CPU stand-in that checks `persistent_logits`' wiring."""
    names = dp.input_names(n_layer)

    def layer_norm(v, g, b):
        mean = v.mean(-1, keepdims=True)
        var = ((v - mean) ** 2).mean(-1, keepdims=True)
        return (v - mean) * mx.rsqrt(var + eps) * g + b

    def run(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value):
        assert len(inputs) == len(names) and init_value == 0
        a, t = dict(zip(names, inputs)), dict(template)
        rows, d = t["B"], t["D"]
        slots = a["offsets"].tolist()
        s = a["x"]
        assert s.shape == (rows, d) and s.dtype == mx.float32 and len(slots) == rows
        for i in range(n_layer):
            xn = s if i == 0 else layer_norm(s, a[f"g2_{i - 1}"], a[f"be2_{i - 1}"])
            qkv = xn @ a[f"wqkv_{i}"].T + a[f"bqkv_{i}"]
            kc, vc = a[f"kc_{i}"], a[f"vc_{i}"]
            heads = kc.shape[1]
            assert kc.shape[2] == a["capacity"].item() and kc.dtype == t["T"]
            for b, slot in enumerate(slots):
                kc[b, :, slot, :] = qkv[b, d:2 * d].reshape(heads, 32).astype(kc.dtype)
                vc[b, :, slot, :] = qkv[b, 2 * d:].reshape(heads, 32).astype(vc.dtype)
            q = qkv[:, :d].reshape(rows, heads, 1, 32)
            scale = 32 ** -0.5
            ctx = ak.reference_attention(q, kc, vc, a["offsets"] + 1, scale).reshape(rows, d)
            h1 = ctx @ a[f"wo_{i}"].T + a[f"bo_{i}"] + xn
            u = layer_norm(h1, a[f"g1_{i}"], a[f"be1_{i}"])
            f = mx.maximum(u @ a[f"w1_{i}"].T + a[f"b1_{i}"], 0)
            s = f @ a[f"w2_{i}"].T + a[f"b2_{i}"] + u
        logits = layer_norm(s, a[f"g2_{n_layer - 1}"], a[f"be2_{n_layer - 1}"]) @ a["whead"].T
        assert output_shapes[0] == (rows, t["V"]) and output_dtypes[0] == mx.float32
        return [logits, mx.zeros(output_shapes[1]), mx.zeros(output_shapes[2], dtype=mx.uint32)]

    return run


def test_the_step_wires_the_model_into_the_kernel_as_the_layer_computes(monkeypatch):
    """On any device: with the kernel replaced by its contract, one persistent step (one row; three
    rows at different slots) gives the MLX-op step's logits and K/V; a wrong wiring is caught."""
    model = gpt()
    monkeypatch.setattr(dp, "_kernel", lambda n_layer, eps, scale: _contract(n_layer, eps))
    for offsets, capacity in (([37], 64), ([0, 130, 63], 192)):
        err, kv_err = dk._check_rows(model, offsets, capacity, mode="persistent")
        assert err < 1e-5 and kv_err < 1e-5, (offsets, err, kv_err)
    real = dp.persistent_inputs

    def norms_swapped(*args):  # norm1's and norm2's parameters in each other's place
        arrays = real(*args)
        for i in range(model.config.n_layer):
            at = 3 + 14 * i
            arrays[at + 4:at + 6], arrays[at + 10:at + 12] = arrays[at + 10:at + 12], arrays[at + 4:at + 6]
        return arrays

    model.h.layers[0].norm2.weight = mx.full(model.h.layers[0].norm2.weight.shape, 2.0)
    assert dk._check_rows(model, [37], 64, mode="persistent")[0] < 1e-5
    monkeypatch.setattr(dp, "persistent_inputs", norms_swapped)
    assert dk._check_rows(model, [37], 64, mode="persistent")[0] > 1e-3


@needs_cuda
def test_the_kernel_launches_one_block_per_multiprocessor():
    assert dp.multiprocessor_count() > dp.FALLBACK_BLOCKS // 4


@needs_cuda
def test_self_check_passes_at_fp32_and_fp16():
    assert dk.self_check(gpt(), mode="persistent")
    assert dk.self_check(apply_precision(gpt(), "fp16"), mode="persistent")


@needs_cuda
@pytest.mark.parametrize("switch", ["1", "kernels"])
def test_each_fused_path_keeps_greedy_tokens_and_logits_across_a_capacity_block(monkeypatch, switch):
    monkeypatch.setenv(dk.ENV_SWITCH, switch)
    model = gpt(hidden=512, heads=16, layers=4)
    # 200 cached positions + 120 steps: the K/V buffers are re-fitted past COMPILE_BLOCK mid-decode
    args = inputs(n_text=60, n_prompt=140)
    assert 200 < COMPILE_BLOCK < 200 + 120
    eager = list(model.decode_steps(*args, top_k=1, max_new_tokens=120, with_logits=True, compile=False))
    assert dk.fused_decode_mode(model) == ("persistent" if switch == "1" else "kernels")
    fused = list(model.decode_steps(*args, top_k=1, max_new_tokens=120, with_logits=True, compile=True))
    assert [s.token for s in fused] == [s.token for s in eager]
    d = np.abs(np.stack([s.logits for s in fused]) - np.stack([s.logits for s in eager])).max()
    assert d <= 1e-4, d


@needs_cuda
def test_batched_rows_take_the_persistent_kernel_and_keep_each_rows_tokens(monkeypatch):
    model = gpt(hidden=256, heads=8, layers=2, seed=2)
    rows = [inputs(5, 3, seed=1), inputs(12, 0, seed=2), inputs(30, 220, seed=3)]
    model.compile_decode = False
    want = [model.generate(*r, top_k=1, max_new_tokens=40).tolist() for r in rows]  # eager, one by one
    modes = []
    real = dk.fused_decode_logits
    monkeypatch.setattr("dora_primespeech_mlx.models.t2s_batch.fused_decode_logits",
                        lambda model, x, *a: modes.append((x.shape[0], a[-1])) or real(model, x, *a))
    model.compile_decode = True
    got = [r.tolist() for r in model.generate_batch(rows, top_k=1, max_new_tokens=40)]
    assert (3, "persistent") in modes, modes
    assert got == want
