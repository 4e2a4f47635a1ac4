"""The engine scheduler (dora_primespeech_mlx/engine_scheduler.py): concurrent requests share decode
steps on the owner thread, and each request's audio and tokens are what `Engine.synthesize_stream` gives
it alone; cancelling or failing one request leaves the others untouched. Tiny random-weight models
(tests/support/tiny_models.py), two GPT files so that two decoders run side by side."""

from __future__ import annotations

import collections
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dora_primespeech_mlx import smoke
from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.engine_scheduler import ScheduledRequest, Scheduler
from dora_primespeech_mlx.options import NothingToSpeak, SynthesisCancelled, SynthesisOptions
from dora_primespeech_mlx.weights.writer import write_torch_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.fast

WINDOWS = {"first_chunk_tokens": 8, "chunk_tokens": 6}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    with tiny_models.private_tiny_dir(tmp_path_factory, "scheduler") as models:
        yield models


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, batch_rows=4)  # the CPU default is 1: force rows


@pytest.fixture(scope="module")
def voices(engine, tiny_dir):
    """Doubao, and "Other": Doubao's SoVITS and clip with a GPT of other random weights (its own decoder)
    whose EOS row is 30x larger, so that its sentences stop on EOS at input-dependent steps (10-30 tokens)
    while Doubao's run to their caps."""
    doubao = engine.registry.get("Doubao")
    gpt = tiny_models.tiny_gpt_config()
    weights = smoke.materialize(smoke.gpt_params(gpt), np.random.default_rng(99))
    head = weights["model.ar_predict_layer.weight"] = weights["model.ar_predict_layer.weight"].copy()
    head[gpt["model"]["EOS"]] *= 30
    path = tiny_dir / "moyoyo" / "GPT_weights" / "other-tiny.ckpt"
    write_torch_file(path, collections.OrderedDict(weight=weights, config=gpt, info="GPT-other"),
                     archive_name=smoke.ARCHIVE_STEM)
    return {"Doubao": doubao, "Other": replace(doubao, id="Other", gpt_weights=path, speed_factor=1.0)}


def alone(engine, req: ScheduledRequest):
    """What `Engine.synthesize_stream` gives the request by itself (one row, the sentence loop)."""
    tokens: list[int] = []
    rows, engine.batch_rows = engine.batch_rows, 1
    try:
        chunks = list(engine.synthesize_stream(req.text, req.voice, req.options, streaming=req.streaming,
                                               first_chunk_tokens=req.first_chunk_tokens,
                                               chunk_tokens=req.chunk_tokens, on_token=tokens.append))
    finally:
        engine.batch_rows = rows
    return chunks, tokens


class Recorder:
    """A request's sink and on_token, and the global order of events."""

    log: list[tuple[str, str]] = []

    def __init__(self, name: str):
        self.name = name
        self.events: list[tuple[str, object]] = []
        self.tokens: list[int] = []

    def sink(self, kind, payload):
        assert not self.events or self.events[-1][0] == "chunk", f"{self.name}: {kind} after {self.events[-1][0]}"
        self.events.append((kind, payload))
        Recorder.log.append((self.name, kind))

    @property
    def chunks(self):
        return [p for k, p in self.events if k == "chunk"]

    @property
    def outcome(self):
        return self.events[-1][0] if self.events else None


def request(rec: Recorder, text, voice, options, streaming, **kw) -> ScheduledRequest:
    return ScheduledRequest(text, voice, rec.sink, options, streaming=streaming, on_token=rec.tokens.append,
                            **{**WINDOWS, **kw})


WAITED: set[str] = set()  # requests that held a finished sentence back for an earlier one (set by `run`)


def run(scheduler: Scheduler, late: dict[int, list[ScheduledRequest]] | None = None, on_step=None) -> list[dict]:
    """Step until idle, submitting `late[n]` before step n; returns per step {decoder: request names}."""
    seen, n = [], 0
    WAITED.clear()
    while scheduler.busy or (late and any(k >= n for k in late)):
        for req in (late or {}).get(n, []):
            scheduler.submit(req)
        if on_step is not None:
            on_step(n)
        scheduler.step()
        seen.append({key: sorted(name_of(r.req.spec) for r in lane.rows.values())
                     for key, lane in scheduler._lanes.items() if lane.rows})
        WAITED.update(name_of(req.spec) for req in scheduler._active if req.ready)
        n += 1
    return seen


def name_of(spec: ScheduledRequest) -> str:
    owner = getattr(spec.sink, "__self__", None)
    return owner.name if isinstance(owner, Recorder) else "?"


def assert_same(rec: Recorder, reference) -> None:
    chunks, tokens = reference
    assert rec.outcome == "done", rec.events[-1]
    assert rec.tokens == tokens and len(tokens) > 0
    got = [(c.sentence_index, c.chunk_index, c.is_final) for c in rec.chunks]
    assert got == [(c.sentence_index, c.chunk_index, c.is_final) for c in chunks]
    for g, w in zip(rec.chunks, chunks):
        assert g.audio.shape == w.audio.shape
        np.testing.assert_allclose(g.audio, w.audio, atol=1e-4)


def test_concurrent_requests_share_steps_and_each_gets_its_own_audio(engine, voices):
    Recorder.log = []
    recs = {name: Recorder(name) for name in ("A", "B", "C", "D", "D2", "E")}
    reqs = {
        "A": request(recs["A"], "第一个请求的第一句。然后是第二句话。", voices["Doubao"],
                     SynthesisOptions(seed=3, max_new_tokens=20), True),
        "B": request(recs["B"], "整段合成。三句话一起解码。Third one is English.", voices["Doubao"],
                     SynthesisOptions(seed=11, top_k=3, temperature=0.9, max_new_tokens=15, text_lang="auto",
                                      fragment_interval=0.05), False),
        "C": request(recs["C"], "另一个模型的句子。", voices["Other"],
                     SynthesisOptions(seed=5, max_new_tokens=40, speed=1.0, noise_scale=0.3), True,
                     first_chunk_tokens=5, chunk_tokens=4),
        "D": request(recs["D"], "整段合成。三句话一起解码。Third one is English.", voices["Other"],
                     SynthesisOptions(seed=8, max_new_tokens=40, text_lang="auto", fragment_interval=0.0), False),
        "D2": request(recs["D2"], "Two sentences here. And another one.", voices["Doubao"],
                      SynthesisOptions(seed=8, top_p=0.8, repetition_penalty=1.2, max_new_tokens=12, text_lang="en"),
                      False),
        "E": request(recs["E"], "后来加入的请求。", "Doubao",
                     SynthesisOptions(seed=21, top_k=1, max_new_tokens=18), True),
    }
    want = {name: alone(engine, req) for name, req in reqs.items()}
    # the premises: C stops on EOS; D's last sentence stops before its second (it waits to leave in order)
    assert len(want["C"][1]) < 40
    d_tokens = [int(c.timings["tokens"]) for c in want["D"][0]]
    assert len(d_tokens) == 3 and d_tokens[2] < d_tokens[1] < 40
    scheduler = Scheduler(engine, max_rows=4)  # Doubao: A, B's three sentences and D2's two do not fit at once
    for name in ("A", "B", "C", "D", "D2"):
        scheduler.submit(reqs[name])
    seen = run(scheduler, late={6: [reqs["E"]]})  # E joins mid-decode
    for name, rec in recs.items():
        assert_same(rec, want[name])
    assert scheduler.in_flight == 0 and scheduler.rows == 0
    assert all(len(names) <= 4 for step in seen for names in step.values())  # rows capped per decoder
    assert any(len(names) == 4 for step in seen for names in step.values())
    # requests shared steps: two decoders in one step, and rows of different requests in one decoder
    assert any(len(step) == 2 for step in seen)
    assert any(len(names) >= 2 for step in seen for names in step.values())
    assert any("E" in names and len(names) >= 2 for step in seen for names in step.values())
    # streaming: one sentence of a request at a time; whole text: sentences decode together
    assert all(names.count("A") <= 1 and names.count("C") <= 1 for step in seen for names in step.values())
    assert max(c.timings["batch_rows"] for c in recs["B"].chunks) >= 2
    assert "D" in WAITED  # its third sentence finished first and left after the second
    # the chunks of different requests interleave (nobody waits for a whole request ahead of it)
    first_e = Recorder.log.index(("E", "chunk"))
    assert first_e < Recorder.log.index(("A", "done")) or first_e < Recorder.log.index(("B", "done"))
    assert recs["A"].chunks[0].timings["frontend_s"] > 0 and "queued_s" in recs["E"].chunks[0].timings


def test_a_newcomer_gets_the_next_free_row_before_a_long_text_takes_it(engine, voices):
    long_rec, new_rec = Recorder("long"), Recorder("new")
    text = "".join(f"第{i}句话。" for i in range(1, 7))  # six sentences stopping on EOS at different steps
    long_req = request(long_rec, text, voices["Other"], SynthesisOptions(seed=2, max_new_tokens=40), False)
    new_req = request(new_rec, "新来的请求。", voices["Other"], SynthesisOptions(seed=3, max_new_tokens=40), True)
    want = {"long": alone(engine, long_req), "new": alone(engine, new_req)}
    lengths = [int(c.timings["tokens"]) for c in want["long"][0]]
    assert len(lengths) == 6 and lengths[0] != lengths[1]  # the premise: its first two rows free one at a time
    scheduler = Scheduler(engine, max_rows=2)
    scheduler.submit(long_req)
    started, joined, n = [], None, 0  # sentences of the long text started after each step
    while scheduler.busy:
        if n == 3:
            scheduler.submit(new_req)
        scheduler.step()
        started.append(next((r.next_row for r in scheduler._active if r.spec is long_req), None))
        if joined is None and (new_rec.tokens or new_rec.events):
            joined = n
        n += 1
    # the first row that frees after the newcomer arrived is its own: the long text started no third
    # sentence before it (with arrival order alone, the long text would take every row it frees)
    assert joined is not None and joined > 3 and set(started[:joined]) == {2}
    assert_same(long_rec, want["long"])
    assert_same(new_rec, want["new"])


def test_cancelling_one_request_keeps_the_others(engine, voices):
    recs = {name: Recorder(name) for name in "ABCS"}
    flag = {"B": False, "S": False}
    reqs = {
        "A": request(recs["A"], "留下的请求。第二句。", voices["Doubao"], SynthesisOptions(seed=1, max_new_tokens=16),
                     True),
        "B": request(recs["B"], "被取消的请求。它有好几句话。第三句。", voices["Doubao"],
                     SynthesisOptions(seed=2, max_new_tokens=30), False, is_cancelled=lambda: flag["B"]),
        "C": request(recs["C"], "另一个留下的。", voices["Other"], SynthesisOptions(seed=3, max_new_tokens=20), True),
        "S": request(recs["S"], "流式的请求在中途取消。", voices["Other"], SynthesisOptions(seed=4, max_new_tokens=30),
                     True, is_cancelled=lambda: flag["S"]),
    }
    want = {name: alone(engine, reqs[name]) for name in "AC"}
    scheduler = Scheduler(engine)
    for req in reqs.values():
        scheduler.submit(req)
    rows_of = collections.defaultdict(list)

    def on_step(n):
        flag["B"] = n >= 5
        flag["S"] = n >= 12
        for name in ("B", "S"):
            rows_of[name].append(sum(r.req.spec is reqs[name] for lane in scheduler._lanes.values()
                                     for r in lane.rows.values()))

    seen = run(scheduler, on_step=on_step)
    # whole text: its sentences decoding together up to step 4, none from step 5 on, and no audio
    assert rows_of["B"][1] >= 2 and set(rows_of["B"][1:6]) == {rows_of["B"][1]} and set(rows_of["B"][6:]) == {0}
    assert recs["B"].outcome == "cancelled" and isinstance(recs["B"].events[-1][1], SynthesisCancelled)
    assert recs["B"].chunks == [] and recs["B"].tokens == []
    # streaming: its first window went out, then it stopped mid-sentence
    assert set(rows_of["S"][1:13]) == {1} and set(rows_of["S"][13:]) == {0}
    assert recs["S"].outcome == "cancelled" and len(recs["S"].chunks) >= 1 and 8 <= len(recs["S"].tokens) < 30
    assert all("B" not in names and "S" not in names for step in seen[12:] for names in step.values())
    for name in "AC":
        assert_same(recs[name], want[name])
    # cancelled before it was admitted: answered without decoding
    late = Recorder("late")
    scheduler.submit(request(late, "不会开始。", voices["Doubao"], None, True, is_cancelled=lambda: True))
    scheduler.step()
    assert late.events == [("cancelled", late.events[0][1])] and late.tokens == [] and not scheduler.busy


def test_a_failing_request_never_disturbs_the_others(engine, voices):
    recs = {name: Recorder(name) for name in ("ok", "ok2", "tokens", "sink", "voice", "empty")}
    reqs = {
        "ok": request(recs["ok"], "正常的请求。还有一句。", voices["Doubao"],
                      SynthesisOptions(seed=4, max_new_tokens=20), True),
        "ok2": request(recs["ok2"], "整段的请求。第二句。", voices["Other"],
                       SynthesisOptions(seed=6, max_new_tokens=14), False),
    }
    want = {name: alone(engine, req) for name, req in reqs.items()}

    def bad_token(token, rec=recs["tokens"]):
        rec.tokens.append(token)
        if len(rec.tokens) == 7:
            raise RuntimeError("on_token failed")

    reqs["tokens"] = ScheduledRequest("在解码中失败的请求。", voices["Doubao"], recs["tokens"].sink,
                                      SynthesisOptions(seed=5, max_new_tokens=30), on_token=bad_token, **WINDOWS)

    def bad_sink(kind, payload, rec=recs["sink"]):
        rec.sink(kind, payload)
        if kind == "chunk":
            raise OSError("the client's queue broke")

    reqs["sink"] = ScheduledRequest("交付失败的请求。", voices["Other"], bad_sink,
                                    SynthesisOptions(seed=7, max_new_tokens=30), **WINDOWS)
    reqs["voice"] = request(recs["voice"], "你好。", "nobody", None, True)
    reqs["empty"] = request(recs["empty"], "😀 ~~~", voices["Doubao"], None, False)
    scheduler = Scheduler(engine)
    for req in reqs.values():
        scheduler.submit(req)
    run(scheduler)
    for name in ("ok", "ok2"):
        assert_same(recs[name], want[name])
    assert recs["tokens"].outcome == "error" and "on_token failed" in str(recs["tokens"].events[-1][1])
    assert len(recs["tokens"].tokens) == 7 and recs["tokens"].chunks == []
    # the sink raised on the first chunk: that request ends with the error, once
    assert [k for k, _ in recs["sink"].events] == ["chunk", "error"]
    assert isinstance(recs["sink"].events[-1][1], OSError)
    assert recs["voice"].outcome == "error" and isinstance(recs["voice"].events[-1][1], KeyError)
    assert recs["empty"].outcome == "error" and isinstance(recs["empty"].events[-1][1], NothingToSpeak)
    assert scheduler.rows == 0 and not scheduler.busy


def test_a_failing_decode_step_fails_its_decoder_only(engine, voices, monkeypatch):
    recs = {name: Recorder(name) for name in ("doubao", "other")}
    reqs = {"doubao": request(recs["doubao"], "这个解码器会出错。", voices["Doubao"], SynthesisOptions(seed=1), True),
            "other": request(recs["other"], "这个不受影响。", voices["Other"],
                             SynthesisOptions(seed=2, max_new_tokens=16), True)}
    want = alone(engine, reqs["other"])
    doubao_t2s = engine.voice_models(voices["Doubao"])[0]
    scheduler = Scheduler(engine)
    for req in reqs.values():
        scheduler.submit(req)
    scheduler.step()
    lane = scheduler._lanes[id(doubao_t2s)]
    monkeypatch.setattr(lane.decoder, "step", lambda: (_ for _ in ()).throw(RuntimeError("device fault")))
    run(scheduler)
    assert recs["doubao"].outcome == "error" and "device fault" in str(recs["doubao"].events[-1][1])
    assert_same(recs["other"], want)
    # the model's next request gets a fresh decoder
    again = Recorder("again")
    scheduler.submit(request(again, "再来一次。", voices["Doubao"], SynthesisOptions(seed=9, max_new_tokens=10), True))
    run(scheduler)
    assert_same(again, alone(engine, request(Recorder("ref"), "再来一次。", voices["Doubao"],
                                             SynthesisOptions(seed=9, max_new_tokens=10), True)))


def test_off_the_owner_thread_is_refused(engine):
    import threading

    from dora_primespeech_mlx.options import WrongThreadError

    scheduler = Scheduler(engine)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(WrongThreadError, scheduler.step)))
    thread.start()
    thread.join()
    assert len(errors) == 1
