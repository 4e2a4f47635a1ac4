"""Batched decode (models/t2s_batch.py, `T2S.generate_batch`): every row gets the tokens the single
decode gives it alone, whatever the other rows do (join, stop, leave), eager and compiled."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dora_primespeech_mlx.models.t2s import T2SConfig
from dora_primespeech_mlx.models.t2s_batch import BatchDecoder
from dora_primespeech_mlx.models.t2s_generate import T2S

pytestmark = pytest.mark.fast

EOS = 1024


def random_model(seed: int = 0, eos_like: int | None = None, eos_gain: float = 1.0) -> T2S:
    """A 2-layer random GPT. With `eos_like`, the EOS head row is `eos_gain` times that token's row, so
    EOS wins wherever that token would: rows stop at different, input-dependent steps."""
    cfg = T2SConfig(vocab_size=1025, phoneme_vocab_size=32, embedding_dim=32, hidden_dim=32, head=4, n_layer=2,
                    bert_dim=16)
    mx.random.seed(seed)
    model = T2S(cfg)
    if eos_like is not None:
        w = np.array(model.ar_predict_layer.weight)
        w[EOS] = eos_gain * w[eos_like]
        model.ar_predict_layer.weight = mx.array(w)
    model.eval()
    return model


def rows(lengths=((5, 4), (11, 0), (3, 9), (8, 2)), seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 32, n), rng.standard_normal((16, n)).astype(np.float32), rng.integers(0, 1024, p))
            for n, p in lengths]


def singles(model, batch_rows, seeds, **kw):
    return [model.generate(*row, seed=s, **kw).tolist() for row, s in zip(batch_rows, seeds)]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_k=5), dict(top_k=20, top_p=0.7, temperature=0.8)])
def test_rows_get_their_single_decode_tokens(compiled, sampling):
    model = random_model()
    model.compile_decode = compiled
    batch_rows, seeds = rows(), [3, 4, 5, 6]
    want = singles(model, batch_rows, seeds, max_new_tokens=30, **sampling)
    got = model.generate_batch(batch_rows, seed=seeds, max_new_tokens=30, **sampling)
    assert [g.tolist() for g in got] == want
    assert len({tuple(w) for w in want}) == 4  # the rows really differ
    # two at a time: rows join as others leave
    got2 = model.generate_batch(batch_rows, seed=seeds, max_new_tokens=30, max_rows=2, **sampling)
    assert [g.tolist() for g in got2] == want


def test_rows_stopping_at_different_steps_leave_without_disturbing_the_rest():
    model = random_model(seed=2, eos_like=17, eos_gain=1.0)
    # find a head where the rows stop at different steps under greedy decoding
    batch_rows = rows(((5, 4), (11, 0), (3, 9), (8, 2), (6, 6), (9, 1)), seed=4)
    for token in range(1024):
        w = np.array(model.ar_predict_layer.weight)
        w[EOS] = 1.3 * w[token]
        model.ar_predict_layer.weight = mx.array(w)
        want = singles(model, batch_rows, [0] * 6, top_k=1, max_new_tokens=60)
        lengths = [len(t) for t in want]
        if len(set(lengths)) >= 3 and max(lengths) < 60:
            break
    else:
        pytest.fail("no head row made the rows stop at different steps")
    got = model.generate_batch(batch_rows, seed=0, top_k=1, max_new_tokens=60)
    assert [g.tolist() for g in got] == want
    got = model.generate_batch(batch_rows, seed=0, top_k=1, max_new_tokens=60, max_rows=3)
    assert [g.tolist() for g in got] == want
    old = model.generate_batch(batch_rows, seed=0, top_k=1, max_new_tokens=60, convention="dora2024")
    assert [o.tolist() for o in old] == [model.generate(*r, top_k=1, max_new_tokens=60, convention="dora2024").tolist()
                                         for r in batch_rows]


def test_per_row_sampling_settings_seeds_and_caps():
    model = random_model(seed=3)
    batch_rows = rows()
    settings = [dict(top_k=1, max_new_tokens=12, seed=None), dict(top_k=5, temperature=1.2, max_new_tokens=25, seed=9),
                dict(top_k=3, repetition_penalty=1.0, max_new_tokens=18, seed=1),
                dict(top_k=50, top_p=0.5, max_new_tokens=25, seed=2)]
    decoder = BatchDecoder(model)
    ids = [decoder.add(*row, **kw) for row, kw in zip(batch_rows, settings)]
    got = {i: [] for i in ids}
    reasons = {}
    while decoder.active:
        for step in decoder.step():
            got[step.row].append(step.token)
            assert step.index == len(got[step.row]) - 1
            if step.stop_reason:
                reasons[step.row] = step.stop_reason
    for row_id, row, kw in zip(ids, batch_rows, settings):
        want = [s.token for s in model.decode_steps(*row, **kw)]
        assert got[row_id] == want
        assert reasons[row_id] == "cap" and len(want) == kw["max_new_tokens"]


def test_a_removed_row_leaves_and_a_late_row_joins_mid_decode():
    model = random_model(seed=5)
    a, b, c = rows(((5, 4), (7, 3), (4, 8)), seed=7)
    decoder = BatchDecoder(model)
    ra = decoder.add(*a, top_k=5, seed=1, max_new_tokens=30)
    rb = decoder.add(*b, top_k=5, seed=2, max_new_tokens=30)
    got = {ra: [], rb: []}
    for n in range(30):
        if n == 6:
            decoder.remove(rb)  # cancelled between steps
            rc = decoder.add(*c, top_k=5, seed=3, max_new_tokens=20)
            got[rc] = []
        for step in decoder.step():
            got[step.row].append(step.token)
    assert decoder.active == 0
    assert got[ra] == model.generate(*a, top_k=5, seed=1, max_new_tokens=30).tolist()
    assert got[rb] == model.generate(*b, top_k=5, seed=2, max_new_tokens=30).tolist()[:6]
    assert got[rc] == model.generate(*c, top_k=5, seed=3, max_new_tokens=20).tolist()
    decoder.remove(12345)  # unknown ids are ignored


def test_batch_crosses_capacity_blocks(monkeypatch):
    import dora_primespeech_mlx.models.t2s_batch as batch_module

    monkeypatch.setattr(batch_module, "COMPILE_BLOCK", 8)  # rows outgrow several blocks in 30 steps
    model = random_model(seed=6)
    model.compile_decode = True
    batch_rows = rows(((5, 4), (11, 0), (3, 9)), seed=8)
    want = singles(model, batch_rows, [1, 2, 3], top_k=5, max_new_tokens=30)
    got = model.generate_batch(batch_rows, seed=[1, 2, 3], top_k=5, max_new_tokens=30)
    assert [g.tolist() for g in got] == want


def test_bad_arguments_are_named():
    model = random_model()
    with pytest.raises(ValueError, match="seed"):
        model.generate_batch(rows(), seed=[1, 2])
    with pytest.raises(ValueError, match="convention"):
        model.generate_batch(rows(), convention="2023")
    with pytest.raises(ValueError, match="max_new_tokens"):
        BatchDecoder(model).add(*rows()[0], max_new_tokens=0)
    with pytest.raises(ValueError, match="phone_ids"):
        model.generate_batch([(np.array([], np.int64), np.zeros((16, 0), np.float32), np.array([1]))])
    assert model.generate_batch([]) == []


def test_warm_up_traces_every_row_count_and_block_so_decoding_never_traces(monkeypatch):
    import dora_primespeech_mlx.models.t2s_batch as batch_module

    monkeypatch.setattr(batch_module, "COMPILE_BLOCK", 16)
    traces = []
    original = batch_module.ScatterKVCache.__init__

    def counting_init(self, *args, **kwargs):  # built only while the compiled step is traced
        traces.append(args[0].shape)
        original(self, *args, **kwargs)

    monkeypatch.setattr(batch_module.ScatterKVCache, "__init__", counting_init)
    model = random_model(seed=8)
    model.compile_decode = True
    sampling = batch_module.RowSampling(top_k=5)
    spent = BatchDecoder(model).warm_up_compiled(3, 48, sampling)
    assert spent > 0 and len({(s[0], s[2]) for s in traces}) == 3 * 3  # rows 1..3 x capacities 16, 32, 48
    traced = len(traces)
    decoder = BatchDecoder(model)  # a new decoder (a new request) reuses the model's traces
    for row, cap in zip(rows(((5, 4), (11, 0), (3, 9))), (30, 12, 20)):
        decoder.add(*row, top_k=5, seed=1, max_new_tokens=cap)
    while decoder.active:
        decoder.step()
    assert len(traces) == traced  # rows left (3 -> 2 -> 1) and blocks grew without a trace
    assert BatchDecoder(model, compile=False).warm_up_compiled(3, 48, sampling) == 0.0
