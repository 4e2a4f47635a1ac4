"""Whole-text synthesis with batched decode: a text's sentences share one GPT decode loop.

Upstream's parallel inference: with streaming off, every sentence of a text goes through
`models.t2s_batch.BatchDecoder` (at most `MAX_BATCH_ROWS` at a time, the next joining as one stops),
and each sentence's SoVITS decode runs as soon as its tokens are complete, between decode steps.
Chunks leave in sentence order, each as soon as it and every earlier sentence are done. A sentence
gets the tokens of its own single decode (same seed `options.seed + index`), so the audio is what the
sentence-by-sentence loop makes, up to float rounding of the batched matmuls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from .models.t2s_batch import BatchDecoder
from .options import AudioChunk, SynthesisCancelled, SynthesisOptions

__all__ = ["MAX_BATCH_ROWS", "synthesize_batched"]

# sentences decoded together: K/V memory grows with rows (~0.1 MB per position per row at fp32),
# and the step cost stops being flat somewhere past this on a GPU
MAX_BATCH_ROWS = 8


def synthesize_batched(engine, sentences: list, caps: list[int], prompt, t2s, sovits, options: SynthesisOptions, *,
                       speed: float, interval: float, cancelled: Callable[[], bool], t_start: float,
                       frontend_s: float, notes: list[str], max_rows: int = MAX_BATCH_ROWS) -> Iterator[AudioChunk]:
    """Yield one chunk per sentence (sentence order), the last with `is_final`. `caps`: each
    sentence's token cap (the engine's length guard); `engine` gives `sample_rate` and `_chunk`.
    A chunk's `t2s_s` is the decode time since the previous sentence stopped, so they sum to the
    loop's decode time."""
    decoder = BatchDecoder(t2s)
    owner: dict[int, int] = {}
    tokens: dict[int, list[int]] = {}
    audio: dict[int, np.ndarray] = {}
    timings: dict[int, dict] = {}
    waiting = list(range(len(sentences)))
    next_out = 0
    decode_s = accounted_s = 0.0
    while next_out < len(sentences):
        if cancelled():
            raise SynthesisCancelled()
        t0 = time.perf_counter()
        while waiting and decoder.active < max_rows:
            i = waiting.pop(0)
            s = sentences[i]
            owner[decoder.add(
                *prompt.gpt_inputs(s),
                top_k=options.top_k, top_p=options.top_p, temperature=options.temperature,
                repetition_penalty=options.repetition_penalty,
                seed=None if options.seed is None else options.seed + i,
                max_new_tokens=caps[i])] = i
            tokens[i] = []
        finished = []
        for step in decoder.step():
            i = owner[step.row]
            if step.stop_reason != "eos":
                tokens[i].append(step.token)
            if step.stop_reason is not None:
                finished.append(i)
        decode_s += time.perf_counter() - t0
        for i in finished:
            t2s_s, accounted_s = decode_s - accounted_s, decode_s
            t0 = time.perf_counter()
            codes = np.asarray(tokens[i] or [0], np.int64)  # upstream decodes a single 0 code on an instant stop
            seed = None if options.seed is None else options.seed + i
            wave = sovits.decode(codes, sentences[i].phone_ids, ge=prompt.style, speed=speed,
                                 noise_scale=options.noise_scale, seed=seed)
            silence = np.zeros(int(round(interval * engine.sample_rate)), np.float32)
            audio[i] = np.concatenate([wave.astype(np.float32), silence])
            timings[i] = {"frontend_s": frontend_s if i == 0 else 0.0, "t2s_s": t2s_s,
                          "sovits_s": time.perf_counter() - t0, "tokens": float(len(tokens[i])),
                          "batch_rows": float(min(max_rows, len(sentences)))}
            if cancelled():
                raise SynthesisCancelled()
        while next_out in audio:
            last = next_out == len(sentences) - 1
            yield engine._chunk(audio.pop(next_out), next_out, 0, last, timings.pop(next_out), t_start, notes)
            next_out += 1
