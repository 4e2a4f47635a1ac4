"""The MLX t2s GPT against the upstream PyTorch oracle (fp32), plus loading, cache and sampler units.

References: refs.npz (tools/oracle/build_fixtures.py) and tools/oracle/refs_t2s.py (long prompt,
upstream `logits_to_probs` on recorded logits), run once per module with the oracle's python.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dora_primespeech_mlx.weights import CheckpointError, read_torch_file
from dora_primespeech_mlx.models.cache import ConcatKVCache, KVCache
from dora_primespeech_mlx.models.sample_utils import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    exponential_race,
    logits_to_probs,
    mask_token,
    seen_mask,
)
from dora_primespeech_mlx.models.t2s import T2SConfig, sanitize, sine_table
from dora_primespeech_mlx.models.t2s_generate import MIN_STEPS_BEFORE_EOS, T2S
from dora_primespeech_mlx.models.t2s_io import load_t2s, save_t2s_safetensors

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # issue 3: prefill logits and per-step logits, fp32


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(fixtures) -> T2S:
    return load_t2s(fixtures.gpt_path)


@pytest.fixture(scope="module")
def inputs(refs):
    return refs["in_phones"][0], refs["in_bert"][0], refs["in_prompt"][0]


@pytest.fixture(scope="module")
def greedy_steps(model, inputs):
    """100 greedy steps with raw logits, as the oracle's reference decode (early_stop_num=99); eager
    (the compiled step is checked against these)."""
    return list(model.decode_steps(*inputs, top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.35,
                                   max_new_tokens=100, with_logits=True, compile=False))


@pytest.fixture(scope="module")
def extra(fixtures, oracle_python, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("t2s_oracle") / "refs_t2s.npz"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    script = ROOT / "tools" / "oracle" / "refs_t2s.py"
    proc = subprocess.run([str(oracle_python), str(script), str(fixtures.root), str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def tiny_model(head_rows: dict[int, float] | None = None, default: float = -3.0, seed: int = 0) -> T2S:
    """A 2-layer random model. With `head_rows`, its last LayerNorm emits the constant hidden vector
    e_0, so the logits are the same at every step: `head_rows` {token: logit}, `default` elsewhere."""
    cfg = T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=32, hidden_dim=32, head=4, n_layer=2,
                    bert_dim=16)
    mx.random.seed(seed)
    model = T2S(cfg)
    if head_rows is not None:
        last = model.h.layers[-1].norm2
        last.weight = mx.zeros((32,))
        last.bias = mx.zeros((32,)).at[0].add(1.0)
        w = np.zeros((1025, 32), np.float32)
        w[:, 0] = default
        for tok, value in head_rows.items():
            w[tok, 0] = value
        model.ar_predict_layer.weight = mx.array(w)
    model.eval()
    return model


def tiny_inputs(n_text: int = 5, n_prompt: int = 4):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 32, n_text), rng.standard_normal((16, n_text)).astype(np.float32),
            rng.integers(0, 1024, n_prompt))


# ------------------------------------------------------------------------------- config, loading


def test_config_from_checkpoint(fixtures):
    config = read_torch_file(fixtures.gpt_path).obj["config"]
    cfg = T2SConfig.from_dict(config)
    got = (cfg.n_layer, cfg.head, cfg.hidden_dim, cfg.vocab_size, cfg.phoneme_vocab_size, cfg.EOS)
    assert got == (24, 16, 512, 1025, 732, 1024)
    assert cfg.ffn_dim == 2048 and cfg.head_dim == 32
    assert T2SConfig.from_dict({"n_layer": 3, "unknown_key": 1, "linear_units": 9}).n_layer == 3
    with pytest.raises(ValueError, match="EOS"):
        T2SConfig.from_dict({"model": {"vocab_size": 1025, "EOS": 0}})


def test_every_parameter_comes_from_the_file(fixtures, model):
    weights = read_torch_file(fixtures.gpt_path).obj["weight"]
    mapped = sanitize(weights)
    assert sanitize(mapped) == mapped  # idempotent
    params = dict(tree_flatten(model.parameters()))
    assert len(weights) == 295 and set(params) == set(mapped)
    for key, value in mapped.items():
        assert params[key].dtype == mx.float32, key
        np.testing.assert_array_equal(np.array(params[key]), value.astype(np.float32), err_msg=key)


def test_strict_load_names_missing_and_unexpected(tmp_path, model):
    good = save_t2s_safetensors(model, tmp_path / "t2s.safetensors")
    arrays, meta = mx.load(str(good), return_metadata=True)
    reloaded = load_t2s(good)
    for (k, a), (k2, b) in zip(tree_flatten(model.parameters()), tree_flatten(reloaded.parameters())):
        assert k == k2 and mx.array_equal(a, b), k  # fp16 cache of fp16-born weights is lossless

    missing = dict(arrays)
    del missing["h.layers.7.norm2.bias"]
    mx.save_safetensors(str(tmp_path / "missing.safetensors"), missing, metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*h\.layers\.7\.norm2\.bias"):
        load_t2s(tmp_path / "missing.safetensors")

    extra_key = dict(arrays, **{"h.layers.0.self_attn.bias_k": mx.zeros((512,))})
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra_key, metadata=meta)
    with pytest.raises(CheckpointError, match="bias_k"):
        load_t2s(tmp_path / "extra.safetensors")

    mx.save_safetensors(str(tmp_path / "foreign.safetensors"), arrays)
    with pytest.raises(CheckpointError, match="convert_t2s"):
        load_t2s(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        load_t2s(tmp_path / "nope.ckpt")


# ------------------------------------------------------------------------------- oracle parity


def test_sine_table_is_interleaved():
    pe = sine_table(300, 512)
    p, i = 257, 10
    w = np.exp(2 * i * -(np.log(10000.0) / 512))
    assert abs(pe[p, 2 * i] - np.sin(p * w)) < 1e-4 and abs(pe[p, 2 * i + 1] - np.cos(p * w)) < 1e-4
    np.testing.assert_array_equal(pe[0, 0::2], 0.0)


def test_prefill_matches_oracle(model, inputs, refs):
    phones, bert, prompt = inputs
    xy = model.embed(phones, bert, prompt)
    hidden = model(xy, model.prefill_mask(phones.size, prompt.size))
    logits = model.ar_predict_layer(hidden)
    d_xy = np.abs(np.array(xy) - refs["t2s_xy_pos"]).max()
    d_hidden = np.abs(np.array(hidden) - refs["t2s_prefill_hidden"]).max()
    d_logits = np.abs(np.array(logits) - refs["t2s_prefill_logits"]).max()
    print(f"prefill max|diff|: xy_pos {d_xy:.2e} hidden {d_hidden:.2e} logits {d_logits:.2e}")
    assert d_xy <= TOL and d_hidden <= TOL and d_logits <= TOL


def test_prefill_mask_is_prefix_lm():
    m = np.array(T2S.prefill_mask(3, 2))
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)


def test_greedy_decode_matches_oracle(greedy_steps, refs):
    tokens = np.array([s.token for s in greedy_steps])
    np.testing.assert_array_equal(tokens, refs["t2s_greedy_tokens"])
    assert [s.stop_reason for s in greedy_steps] == [None] * 99 + ["cap"]
    raw = np.stack([s.logits for s in greedy_steps])
    d = np.abs(raw - refs["t2s_step_logits_raw"][0]).max(axis=1)
    print(f"greedy per-step raw logits max|diff|: {d.max():.2e} (step {d.argmax()})")
    assert d.max() <= TOL


def test_generate_returns_oracle_tokens(model, inputs, refs):
    up = model.generate(*inputs, top_k=1, max_new_tokens=12)
    assert up.dtype == np.int64
    np.testing.assert_array_equal(up, refs["t2s_greedy_tokens"][:12])  # upstream: exactly N tokens, no EOS


def test_batched_decode_returns_oracle_tokens(model, inputs, extra, refs):
    # the full-size GPT with a second, longer row beside it: row 0 still gets upstream's greedy tokens
    long_row = (extra["long_phones"], extra["long_bert"], extra["long_prompt"])
    batch = model.generate_batch([inputs, long_row], top_k=1, max_new_tokens=12)
    np.testing.assert_array_equal(batch[0], refs["t2s_greedy_tokens"][:12])
    np.testing.assert_array_equal(batch[1], model.generate(*long_row, top_k=1, max_new_tokens=12))


def test_long_prompt_prefill_matches_oracle(model, extra):
    # the public numpy API on >= 250 positions (audio positions up to 199)
    phones, bert, prompt = extra["long_phones"], extra["long_bert"], extra["long_prompt"]
    assert phones.size + prompt.size >= 250
    logits = model.prefill_logits(phones, bert, prompt)
    assert logits.shape == (phones.size + prompt.size, 1025) and logits.dtype == np.float32
    d = np.abs(logits - extra["long_prefill_logits"]).max()
    print(f"long prompt ({phones.size}+{prompt.size}) prefill logits max|diff|: {d:.2e}")
    assert d <= TOL


def test_sampler_filters_match_upstream(extra):
    # the cases avoid cumulative probabilities within float32 noise of top_p
    assert extra["case_min_top_p_margin"] > 1e-5
    worst = 0.0
    for i, (top_k, top_p, temp, rp, eos_masked) in enumerate(extra["case_params"]):
        logits = mx.array(extra["case_logits"][i])[None]
        prev = extra["case_prev"][i, : extra["case_prev_len"][i]]
        pen = apply_repetition_penalty(logits, seen_mask(mx.array(prev), 1025), float(rp))
        if eos_masked:
            pen = mask_token(pen, 1024)
        np.testing.assert_allclose(np.array(pen[0]), extra["case_penalised"][i], rtol=1e-6, atol=0, err_msg=f"case {i}")
        probs = np.array(logits_to_probs(pen, top_k=int(top_k) or None, top_p=float(top_p), temperature=float(temp))[0])
        ref = extra["case_probs"][i]
        np.testing.assert_array_equal(probs > 0, ref > 0, err_msg=f"allowed set, case {i} {extra['case_params'][i]}")
        worst = max(worst, float(np.abs(probs - ref).max()))
    print(f"sampler probabilities max|diff| over {len(extra['case_params'])} cases: {worst:.2e}")
    assert worst <= 1e-6


# ---------------------------------------------------------------------------- sampler units


def test_repetition_penalty_once_per_unique_token():
    logits = mx.array([[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]])
    seen = seen_mask(mx.array([0, 0, 0, 3, 4, 4]), 6)  # duplicates must not compound
    out = np.array(apply_repetition_penalty(logits, seen, 1.35))[0]
    np.testing.assert_allclose(out, [-2.7, -1.0, 0.0, 1 / 1.35, 2 / 1.35, 3.0], rtol=1e-6)


def test_top_k_keeps_ties_and_top_p_comes_before_temperature():
    kept = np.isfinite(np.array(apply_top_k(mx.array([[1.0, 2.0, 2.0, 3.0]]), 2))[0])
    np.testing.assert_array_equal(kept, [False, True, True, True])
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    # upstream drops the token that crosses top_p: cum = .5 .8 .95 1.
    assert np.isfinite(np.array(apply_top_p(logits, 0.7))[0]).tolist() == [True, False, False, False]
    assert np.isfinite(np.array(apply_top_p(logits, 0.85))[0]).tolist() == [True, True, False, False]
    # a hot temperature flattens the distribution; top-p must still see the untempered one
    probs = np.array(logits_to_probs(logits, top_p=0.85, temperature=100.0))[0]
    assert (probs > 0).tolist() == [True, True, False, False]
    np.testing.assert_allclose(probs[:2], [0.5, 0.5], atol=0.01)


def test_exponential_race_draws_the_distribution():
    p = np.array([0.1, 0.2, 0.0, 0.7], np.float32)
    draws = np.array(exponential_race(mx.array(np.tile(p, (40000, 1))), mx.random.key(7)))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[2] == 0.0
    np.testing.assert_allclose(freq, p, atol=0.01)


# ------------------------------------------------------------------------------ decode loop


def test_eos_masked_for_first_steps_then_argmax_stops():
    # EOS is the argmax from the start. While masked, top-2 is {7, 8}; from step 11 it is {EOS, 7}
    # and the argmax stops decoding whatever was sampled (a 7 about half of the time).
    model = tiny_model({1024: 1.0, 7: 0.999, 8: 0.998})
    last_samples = []
    for seed in range(6):
        steps = list(model.decode_steps(*tiny_inputs(), top_k=2, repetition_penalty=1.0, seed=seed, max_new_tokens=50))
        assert [s.stop_reason for s in steps] == [None] * MIN_STEPS_BEFORE_EOS + ["eos"]
        assert {s.token for s in steps[:-1]} <= {7, 8}
        last_samples.append(steps[-1].token)
    assert set(last_samples) == {7, 1024}  # both ways of stopping were exercised
    up = model.generate(*tiny_inputs(), top_k=2, repetition_penalty=1.0, seed=0)
    assert up.size == MIN_STEPS_BEFORE_EOS and set(up.tolist()) <= {7, 8}  # the stop step's sample is dropped
    old = model.generate(*tiny_inputs(), top_k=2, repetition_penalty=1.0, seed=0, convention="dora2024")
    np.testing.assert_array_equal(old, up[1:])


def test_sampled_eos_stops_even_when_argmax_is_not_eos():
    model = tiny_model({7: 1.0, 1024: 0.999, 8: 0.998})  # argmax is always 7 (no penalty)
    steps = list(model.decode_steps(*tiny_inputs(), top_k=2, repetition_penalty=1.0, seed=3, max_new_tokens=60))
    assert steps[-1].stop_reason == "eos" and steps[-1].token == 1024 and steps[-1].index >= MIN_STEPS_BEFORE_EOS
    assert {s.token for s in steps[:-1]} <= {7, 8}


def test_repetition_penalty_covers_prompt_and_history_in_decode():
    # logits 5: 1.0, 6: 0.9, 9: 0.8. 5 is in the prompt (twice): 1/1.35 = .741 < .9, so 6; then 6 is
    # penalised (.667) and 9 (.8) wins; then 9 (.593) < 5 (.741, penalised once, not compounding): 5, 5
    model = tiny_model({5: 1.0, 6: 0.9, 9: 0.8, 1024: -5.0})
    phones, bert, _ = tiny_inputs()
    toks = model.generate(phones, bert, np.array([5, 5, 100]), top_k=1, max_new_tokens=4)
    np.testing.assert_array_equal(toks, [6, 9, 5, 5])


def test_max_new_tokens_and_step_vs_concat_cache():
    model = tiny_model()
    args = tiny_inputs(n_prompt=0)  # ref-free: text only
    a = list(model.decode_steps(*args, top_k=5, seed=11, max_new_tokens=6, with_logits=True))
    b = list(model.decode_steps(*args, top_k=5, seed=11, max_new_tokens=6, with_logits=True, cache_kind="concat"))
    assert [s.token for s in a] == [s.token for s in b] and a[-1].stop_reason == "cap" and len(a) == 6
    np.testing.assert_allclose(np.stack([s.logits for s in a]), np.stack([s.logits for s in b]), atol=1e-6)
    up = model.generate(*args, top_k=5, seed=11, max_new_tokens=6)
    np.testing.assert_array_equal(up, [s.token for s in a])  # the cap keeps the last token
    old = model.generate(*args, top_k=5, seed=11, max_new_tokens=6, convention="dora2024")
    np.testing.assert_array_equal(old, up[1:5])  # 2024 code: first lost, last dropped on any stop
    assert model.generate(*args, max_new_tokens=0).size == 0
    with pytest.raises(ValueError, match="phone_ids"):
        model.generate(np.array([99]), np.zeros((16, 1), np.float32), None)


def test_kv_cache_grows_in_blocks_like_concat():
    step, concat = KVCache(step=4), ConcatKVCache()
    rng = np.random.default_rng(0)
    for n in (3, 1, 1, 5, 1):
        k = mx.array(rng.standard_normal((1, 2, n, 3)).astype(np.float32))
        v = k * 2
        ks, vs = step.update_and_fetch(k, v)
        kc, vc = concat.update_and_fetch(k, v)
        assert mx.array_equal(ks, kc) and mx.array_equal(vs, vc)
    assert step.offset == concat.offset == 11 and step.keys.shape[2] == 12


# ------------------------------------------------------------------------------ compiled decode


def test_compiled_decode_matches_eager_on_the_gpt(fixtures, model, inputs, greedy_steps):
    # by default load_t2s compiles on a GPU only (measured faster there, slower on mlx-cpu)
    assert model.compile_decode == (mx.default_device().type == mx.gpu)
    # load_t2s(compile=True) makes the compiled static-cache step the default of decode_steps;
    # the eager reference is the first steps of the 100-step greedy run
    compiled = load_t2s(fixtures.gpt_path, compile=True)
    n = 6
    steps = list(compiled.decode_steps(*inputs, top_k=1, max_new_tokens=n, with_logits=True))
    assert compiled._compiled_steps, "compile=True did not take the compiled path"
    assert [s.token for s in steps] == [s.token for s in greedy_steps[:n]]
    d = np.abs(np.stack([s.logits for s in steps]) - np.stack([s.logits for s in greedy_steps[:n]])).max()
    print(f"compiled vs eager per-step logits max|diff| ({n} steps): {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("sampling", [{"top_k": 1}, {"top_k": 5, "top_p": 0.9, "temperature": 0.8, "seed": 5}])
def test_compiled_step_crosses_buckets_like_eager(monkeypatch, sampling):
    # 9 prefill positions + 30 steps with 8-position buckets: the static cache grows 4 times
    import dora_primespeech_mlx.models.t2s_generate as t2s_module

    monkeypatch.setattr(t2s_module, "COMPILE_BLOCK", 8)
    model = tiny_model(seed=1)
    args = tiny_inputs()
    ref = list(model.decode_steps(*args, max_new_tokens=30, with_logits=True, **sampling))
    for compile_ in (False, True):  # the static cache eagerly, then through mx.compile
        got = list(model.decode_steps(*args, max_new_tokens=30, with_logits=True, cache_kind="static",
                                      compile=compile_, **sampling))
        assert [s.token for s in got] == [s.token for s in ref], compile_
        d = np.abs(np.stack([s.logits for s in got]) - np.stack([s.logits for s in ref])).max()
        assert d <= 1e-5, (compile_, d)
    assert len(model._compiled_steps) == 1
    with pytest.raises(ValueError, match="static cache"):
        next(model.decode_steps(*args, compile=True, cache_kind="concat"))


def test_warm_up_traces_each_block_and_changes_nothing(monkeypatch):
    """`warm_up_compiled` runs the compiled step on every cache capacity up to its limit (dummy
    inputs, results dropped): a decode afterwards equals one without warm-up."""
    import dora_primespeech_mlx.models.t2s_generate as t2s_module

    monkeypatch.setattr(t2s_module, "COMPILE_BLOCK", 8)
    args = tiny_inputs()
    cold = tiny_model(seed=1)
    ref = list(cold.decode_steps(*args, max_new_tokens=20, with_logits=True, compile=True, top_k=1))
    warm = tiny_model(seed=1)
    traced = []
    original = warm._static_step

    def spy(sample, compiled):
        fn = original(sample, compiled)

        def call(token, audio_pos, offset, seen, key, eos_allowed, keys, values):
            traced.append(keys[0].shape[2])
            return fn(token, audio_pos, offset, seen, key, eos_allowed, keys, values)

        return call

    monkeypatch.setattr(warm, "_static_step", spy)
    assert warm.warm_up_compiled(30, top_k=1) > 0
    assert traced == [8, 16, 24]  # capacities up to 30 positions in 8-position blocks
    got = list(warm.decode_steps(*args, max_new_tokens=20, with_logits=True, compile=True, top_k=1))
    assert [s.token for s in got] == [s.token for s in ref]
    assert np.abs(np.stack([s.logits for s in got]) - np.stack([s.logits for s in ref])).max() == 0.0


def test_compiled_steps_are_bounded_least_recently_used():
    import dora_primespeech_mlx.models.t2s_generate as t2s_module

    model = tiny_model(seed=1)
    settings = [(k, 1.0, 1.0, 1.35) for k in range(1, 8)]
    for s in settings:
        model._static_step(model._sample_fn(*s), True)
    model._static_step(model._sample_fn(*settings[4]), True)  # used again: kept
    keys = [settings for settings, _fused in model._compiled_steps]  # keyed (sampling settings, fused kernels)
    assert len(keys) == t2s_module.MAX_COMPILED_STEPS
    assert keys[-1] == settings[4] and settings[0] not in keys
