"""End-to-end speed: our engine (whole and streamed) vs upstream's PyTorch pipeline, one fixed text.

    python benchmarks/bench_e2e.py [--tokens 50] [--model-dir DIR] [--voice Doubao] [--json out.json]

A fixed 60-character mixed Chinese/English text (three sentences after dora-primespeech's split) is
synthesised once per mode with the same token count per sentence on both sides (random weights never
emit EOS, so the count is a cap that is always reached; a real voice may stop earlier, the JSON
records the counts):

- MLX whole: `Engine.synthesize` (audio only after the whole text, like dora-primespeech's batch mode);
- MLX streamed: `Engine.synthesize_stream(..., streaming=True)`, audio chunks while the GPT generates;
- PyTorch: upstream's frontend, BERT, GPT (`infer_panel_naive`) and SoVITS `decode` in an oracle
  subprocess (tools/oracle/bench_e2e_torch.py) on the same model files, sentences and segments.

Reported: total time, first-audio latency (upstream: its first sentence's audio, and the whole text,
which is when dora-primespeech's batch mode delivers), per-stage time (frontend, BERT, GPT, SoVITS),
RTF, peak RSS of each process, voice preparation (HuBERT prompt codes, reference spectrogram and
style, prompt transcript) and model loading, each timed on its own. Both sides first run a short
warm-up sentence (`--warmup-tokens`, 0 to skip). Without --model-dir it uses the oracle-built smoke
voice (random weights at full v2 size). `ORACLE_TORCH_DEVICE=cuda` runs the PyTorch side on the GPU.
Table to stdout, JSON to out/bench_e2e.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from harness import ROOT, add_json_arg, machine_info, oracle_on_path, peak_rss_mb, write_report

oracle_on_path()

from dora_primespeech_mlx.audio import load_reference_audio
from dora_primespeech_mlx.engine import Engine
from dora_primespeech_mlx.options import SynthesisOptions
from dora_primespeech_mlx.text import english
from dora_primespeech_mlx.text.frontend import piece_to_sentence, text_to_phone_segments

# 60 characters, three sentences after the split, English words inside Chinese sentences
TEXT = "欢迎使用GPT-SoVITS语音合成，这个demo运行在Apple的MLX框架上。它支持中文和English混合的句子。"
WARMUP_TEXT = "你好，欢迎光临。"


def segments_for_oracle(sentence) -> list[dict]:
    """Our sentence's language spans as the oracle converts them; English spans carry our POS tags
    when they need any (upstream's nltk tagger needs data the oracle lacks)."""
    out = []
    for seg in sentence.segments:
        tags = english.pos_tags(english.text_normalize(seg.text)) if seg.lang == "en" else None
        out.append({"lang": seg.lang, "text": seg.text, "tags": None if tags is None else [list(t) for t in tags]})
    return out


def prompt_transcript(voice) -> str:
    """The transcript as `Engine.prepare_voice` feeds it (a stop appended when it has none)."""
    text = voice.prompt_text.strip()
    if text and text[-1] not in "。.!?！？…":
        text += "。" if voice.prompt_lang != "en" else "."
    return text


class StageClock:
    """Accumulates the time spent in BERT (the engine folds it into `frontend_s`)."""

    def __init__(self, bert):
        self.bert_s = 0.0
        original = bert.phone_features

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.bert_s += time.perf_counter() - t0

        bert.phone_features = timed  # instance attribute: shadows the method for this engine only


def stage_times(timings: dict, bert_s: float) -> dict:
    """Frontend / BERT / GPT / SoVITS seconds from summed chunk timings.

    The engine times each sentence's frontend (`frontend_s` for the first, `frontend_next_s` for the
    next ones, run lazily) with its BERT inside; BERT comes from `StageClock` unless the engine
    reports `bert_s` itself.
    """
    bert = timings.get("bert_s", bert_s)
    front = sum(v for k, v in timings.items() if k.startswith("frontend"))
    if "bert_s" not in timings:
        front -= bert_s
    return {"frontend_s": front, "bert_s": bert, "t2s_s": timings.get("t2s_s", 0.0),
            "sovits_s": timings.get("sovits_s", 0.0), "engine_timings": dict(timings)}


def run_streamed(engine: Engine, voice, options: SynthesisOptions, args) -> tuple[dict, dict]:
    params = inspect.signature(engine.synthesize_stream).parameters
    kwargs: dict = {}
    mode = "per-sentence (this engine has no `streaming` argument)"
    if "streaming" in params:
        kwargs["streaming"] = True
        mode = "streaming=True"
        if args.first_chunk_tokens and "first_chunk_tokens" in params:
            kwargs["first_chunk_tokens"] = args.first_chunk_tokens
        if args.chunk_tokens and "chunk_tokens" in params:
            kwargs["chunk_tokens"] = args.chunk_tokens
    summed: dict[str, float] = {}
    arrivals, sizes, tokens = [], [], {}
    t0 = time.perf_counter()
    for chunk in engine.synthesize_stream(TEXT, voice, options, **kwargs):
        arrivals.append(time.perf_counter() - t0)
        sizes.append(chunk.duration)
        for k, v in chunk.timings.items():
            if k == "tokens":
                tokens[chunk.sentence_index] = int(v)
            elif k not in ("elapsed_s", "peak_memory_mb"):
                summed[k] = summed.get(k, 0.0) + v
    total = time.perf_counter() - t0
    audio_s = float(sum(sizes))
    run = {"mode": mode, "kwargs": kwargs, "total_s": total, "first_chunk_s": arrivals[0],
           "first_chunk_audio_s": sizes[0], "chunks": len(arrivals), "chunk_arrivals_s": arrivals,
           "chunk_audio_s": sizes, "tokens": [tokens[k] for k in sorted(tokens)], "audio_s": audio_s,
           "rtf": total / audio_s}
    return run, summed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=50, help="semantic tokens per sentence, both sides")
    ap.add_argument("--model-dir", type=Path, help="PrimeSpeech model dir (default: the oracle's smoke voice)")
    ap.add_argument("--voice", default="Doubao")
    ap.add_argument("--warmup-tokens", type=int, default=5, help="tokens of the warm-up sentence (0: none)")
    ap.add_argument("--first-chunk-tokens", type=int, help="streamed mode: tokens before the first chunk")
    ap.add_argument("--chunk-tokens", type=int, help="streamed mode: tokens per later chunk")
    add_json_arg(ap, "bench_e2e")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--runs", type=int, default=3, help="runs per MLX mode; the median run is reported")
    args = ap.parse_args(argv)
    import oracle_env

    model_dir = args.model_dir or oracle_env.ensure_fixtures() / "model_dir"
    options = SynthesisOptions(max_new_tokens=args.tokens, seed=0)
    report: dict = {**machine_info(), "model_dir": str(model_dir), "voice": args.voice,
                    "text": TEXT, "text_chars": len(TEXT), "tokens_per_sentence": args.tokens,
                    "warmup_tokens": args.warmup_tokens}

    # ---- MLX: load, prepare the voice, warm up, then one whole and one streamed run
    t0 = time.perf_counter()
    engine = Engine(model_dir)
    voice = engine.registry.get(args.voice)
    engine.voice_models(voice)
    engine.hubert()
    clock = StageClock(engine.bert())
    ours: dict = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    prompt = engine.prepare_voice(voice)
    ours["voice_prepare_s"] = time.perf_counter() - t0
    report["speed"] = voice.speed_factor
    sentences = text_to_phone_segments(TEXT, options.text_lang or voice.text_lang)
    report["sentences"] = [s.text for s in sentences]
    report["phones_per_sentence"] = [len(s.phone_ids) for s in sentences]
    report["prompt"] = {"codes": int(prompt.prompt_codes.size), "phones": int(prompt.prompt_phone_ids.size)}
    if args.warmup_tokens:
        engine.synthesize(WARMUP_TEXT, voice, SynthesisOptions(max_new_tokens=args.warmup_tokens, seed=0))

    def run_whole() -> dict:
        clock.bert_s = 0.0
        result = engine.synthesize(TEXT, voice, options)
        return {"total_s": result.timings["total_s"], "first_chunk_s": result.timings["total_s"],
                "audio_s": result.duration, "rtf": result.timings["total_s"] / result.duration,
                "sentences": result.sentences, "tokens_total": int(result.timings.get("tokens", 0)),
                **stage_times(result.timings, clock.bert_s), "peak_rss_mb": peak_rss_mb()}

    def run_stream() -> dict:
        clock.bert_s = 0.0
        streamed, summed = run_streamed(engine, voice, options, args)
        streamed.update(stage_times(summed, clock.bert_s), peak_rss_mb=peak_rss_mb())
        return streamed

    def median_run(fn) -> dict:
        """`--runs` runs in a row; the one with the median total, plus every run's total and first audio."""
        runs = sorted((fn() for _ in range(args.runs)), key=lambda r: r["total_s"])
        pick = dict(runs[len(runs) // 2])
        pick["runs_total_s"] = [r["total_s"] for r in runs]
        pick["runs_first_chunk_s"] = [r["first_chunk_s"] for r in runs]
        return pick

    ours["whole"] = whole = median_run(run_whole)
    ours["streamed"] = streamed = median_run(run_stream)
    ours["mlx_peak_memory_mb"] = mx.get_peak_memory() / 1e6
    report["mlx"] = ours

    # ---- PyTorch: same files, sentences and segments, in the oracle venv
    if not args.no_torch:
        lang = options.text_lang or voice.text_lang
        payload = {
            "gpt": str(voice.gpt_weights), "sovits": str(voice.sovits_weights),
            "hubert_dir": str(engine.moyoyo / "chinese-hubert-base"),
            "bert_dir": str(engine.moyoyo / "chinese-roberta-wwm-ext-large"), "tokens": args.tokens,
            "top_k": options.top_k, "top_p": options.top_p, "temperature": options.temperature,
            "repetition_penalty": options.repetition_penalty, "noise_scale": options.noise_scale,
            "speed": voice.speed_factor, "seed": options.seed, "fragment_interval": 0.07,
            "prompt_segments": segments_for_oracle(piece_to_sentence(prompt_transcript(voice), voice.prompt_lang)),
            "sentences": [segments_for_oracle(s) for s in sentences],
            "warmup": ({"sentences": [segments_for_oracle(s) for s in text_to_phone_segments(WARMUP_TEXT, lang)],
                        "tokens": args.warmup_tokens} if args.warmup_tokens else None),
        }
        ref = load_reference_audio(voice.reference_audio)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "payload.json").write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
            np.savez(Path(tmp) / "inputs.npz", wav16k_padded=ref.wav16k_padded, wav32k=ref.wav32k)
            proc = oracle_env.run_script(ROOT / "tools/oracle/bench_e2e_torch.py", str(Path(tmp) / "payload.json"),
                                         str(Path(tmp) / "inputs.npz"))
        report["torch"] = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = report["torch"]["run"]
        if theirs["phones"] != report["phones_per_sentence"]:
            print(f"WARNING: phone counts differ: MLX {report['phones_per_sentence']}, PyTorch {theirs['phones']}",
                  file=sys.stderr)
        if theirs["tokens"] != streamed["tokens"] or sum(theirs["tokens"]) != whole["tokens_total"]:
            print(f"WARNING: token counts differ: MLX {streamed['tokens']} (whole {whole['tokens_total']}), "
                  f"PyTorch {theirs['tokens']}: an EOS came early; times are not like for like", file=sys.stderr)

    print_table(report)
    write_report(report, args.json)
    return 0


def print_table(report: dict) -> None:
    w, s = report["mlx"]["whole"], report["mlx"]["streamed"]
    t = report.get("torch", {}).get("run", {})
    tv = report.get("torch", {}).get("voice_prepare", {})
    print(f"text: {report['text']!r} ({report['text_chars']} chars, {len(report['sentences'])} sentences, "
          f"{report['tokens_per_sentence']} tokens each); MLX {report['device']}, "
          f"PyTorch {report.get('torch', {}).get('device', '-')}; streamed mode: {s['mode']} {s.get('kwargs', '')}")
    cols = ("MLX whole", "MLX streamed", "PyTorch")
    print(f"{'metric':<30}" + "".join(f"{c:>14}" for c in cols))

    def row(name, a, b, c, fmt="{:>14.3f}"):
        cells = [fmt.format(v) if isinstance(v, (int, float)) else f"{'-' if v is None else v:>14}" for v in (a, b, c)]
        print(f"{name:<30}" + "".join(cells))

    row("total s", w["total_s"], s["total_s"], t.get("total_s"))
    row("first audio s", w["first_chunk_s"], s["first_chunk_s"], t.get("first_sentence_s"))
    row("first audio / total", w["first_chunk_s"] / w["total_s"], s["first_chunk_s"] / s["total_s"],
        t["first_sentence_s"] / t["total_s"] if t else None)
    row("  upstream batch: whole text s", None, None, t.get("total_s"))
    for k, name in (("frontend_s", "frontend s"), ("bert_s", "BERT s"), ("t2s_s", "GPT s"), ("sovits_s", "SoVITS s")):
        row(name, w[k], s[k], t.get(k))
    row("tokens (all sentences)", w["tokens_total"], sum(s["tokens"]), sum(t["tokens"]) if t else None, "{:>14d}")
    row("audio s", w["audio_s"], s["audio_s"], t.get("audio_s"))
    row("RTF", w["rtf"], s["rtf"], t.get("rtf"))
    row("peak RSS MB (process)", w["peak_rss_mb"], s["peak_rss_mb"], report.get("torch", {}).get("peak_rss_mb"), "{:>14.0f}")
    row("voice prepare s", report["mlx"]["voice_prepare_s"], None, tv.get("total_s"))
    row("model load s", report["mlx"]["load_s"], None, report.get("torch", {}).get("load_s"))
    print(f"streamed chunks: {s['chunks']}, arrivals s: {', '.join(f'{x:.2f}' for x in s['chunk_arrivals_s'])}")
    print(f"first audio / whole-utterance time: {s['first_chunk_s'] / w['total_s']:.3f} "
          f"(streamed first chunk over the whole mode's total)")
    for mode in ("whole", "streamed"):
        runs = report["mlx"][mode]
        print(f"{mode} runs total s: {', '.join(f'{x:.3f}' for x in runs['runs_total_s'])}; first audio s: "
              f"{', '.join(f'{x:.3f}' for x in runs['runs_first_chunk_s'])}")


if __name__ == "__main__":
    sys.exit(main())
