"""`gpt-sovits-mlx`: command-line tools over the engine.

Subcommands:
  synthesize TEXT  speak TEXT with a voice into a WAV file, with a timing summary
  convert          convert a voice's (or all voices') checkpoints into the safetensors cache ahead of time
  bench            machine, MLX, GPT decode ms/token (eager/compiled, fp32/fp16), first audio, RTF (--json)
  voices           list the voices and whether their files exist under the model directory
  inspect PATH     read a GPT .ckpt, SoVITS .pth or HF model folder without torch and summarise it
  download         fetch the voices, encoders and G2PW model from the Hugging Face Hub (extra [download])
  serve            the OpenAI-compatible speech server, POST /v1/audio/speech (extra [server]; docs/server.md)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .weights import (
    CheckpointError,
    check_state_dict,
    load_hf_weights,
    plain_config,
    read_json_config,
    read_torch_file,
    short_repr,
)


def _summarise_state(state: dict) -> dict:
    dtypes = Counter(str(v.dtype) for v in state.values() if isinstance(v, np.ndarray))
    params = sum(int(v.size) for v in state.values() if isinstance(v, np.ndarray))
    return {"tensors": len(state), "parameters": params, "dtypes": dict(dtypes)}


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(os.path.expandvars(os.path.expanduser(args.path)))
    if path.is_dir():
        summary = {"path": str(path), "kind": "hf-folder", **_summarise_state(load_hf_weights(path))}
        if (path / "config.json").exists():
            summary["model_type"] = read_json_config(path / "config.json").get("model_type")
    else:
        ckpt = read_torch_file(path)
        obj = ckpt.obj
        summary = {"path": str(path), "archive_folder": ckpt.archive_folder, "version_tag": ckpt.version_tag}
        if isinstance(obj, Mapping) and "weight" in obj:
            weights = check_state_dict(path, obj["weight"], what="the 'weight' entry")
            config = plain_config(obj["config"], path) if obj.get("config") is not None else {}
            summary.update(kind="gpt-sovits-checkpoint", info=info if isinstance(info := obj.get("info"), str) else short_repr(info), **_summarise_state(weights))
            summary["config_model"] = config.get("model")
        else:
            summary.update(kind="state-dict", **_summarise_state(check_state_dict(path, obj)))
    print(json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from .voices import BUILTIN_FILE  # the packaged copy: an installed wheel has no repository beside it

    registry = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))
    model_dir = Path(os.path.expandvars(os.path.expanduser(args.model_dir))) if args.model_dir else None
    for voice in registry["voices"]:
        status = ""
        if model_dir is not None:
            moyoyo = model_dir / "moyoyo"
            missing = [k for k in ("gpt_weights", "sovits_weights", "reference_audio") if not (moyoyo / voice[k]).exists()]
            status = "ok" if not missing else "missing " + ", ".join(missing)
        print(f"{voice['id']:<12} {voice['text_lang']:<3} speed {voice['speed_factor']:<4} {status}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    import resource

    import soundfile as sf

    from .engine import Engine
    from .options import SynthesisOptions

    text = args.text_opt if args.text_opt is not None else args.text
    if not text:
        print("error: give the text to speak, e.g. gpt-sovits-mlx synthesize '你好' --out hello.wav", file=sys.stderr)
        return 2
    engine = Engine(args.model_dir)  # this thread owns it: every MLX call below runs here (engine.py)
    print(f"MLX: {engine.backend}", file=sys.stderr)
    voice = engine.registry.get(args.voice)
    missing = voice.missing_files()
    if missing:
        print(f"error: voice {voice.id!r} is missing {', '.join(map(str, missing))}; put the PrimeSpeech files "
              f"under {engine.moyoyo} or set --model-dir", file=sys.stderr)
        return 1
    options = SynthesisOptions(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, speed=args.speed,
                               seed=args.seed, text_lang=args.lang, max_new_tokens=args.max_tokens)
    t0 = time.perf_counter()
    engine.prepare_voice(voice)
    prepare_s = time.perf_counter() - t0
    if args.stream:
        result = _synthesize_streaming(engine, text, voice, options)
    else:
        result = engine.synthesize(text, voice, options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, result.audio, result.sample_rate, subtype="PCM_16" if args.format == "pcm16" else "FLOAT")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    summary = {"out": str(out), "voice": voice.id, "audio_s": round(result.duration, 3), "sentences": result.sentences,
               "load_and_prepare_s": round(prepare_s, 3), **{k: round(v, 4) for k, v in result.timings.items()},
               "peak_rss_mb": round(peak_mb, 1)}
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import load_sovits_cached, load_t2s_cached
    from .voices import VoiceRegistry

    registry = VoiceRegistry(args.model_dir)
    if args.coreml:
        from .coreml import convert_coreml

        t0 = time.perf_counter()
        out = convert_coreml(registry.model_dir, args.out)
        print(f"Core ML encoders written to {out} ({time.perf_counter() - t0:.0f} s)")
    ids = registry.ids() if args.all else [args.voice]
    done, missing = set(), []
    for vid in ids:
        voice = registry.get(vid)
        if not voice.gpt_weights.exists():
            missing.append(f"{vid}: {voice.gpt_weights}")
            continue
        if voice.gpt_weights in done:
            continue
        t0 = time.perf_counter()
        load_t2s_cached(voice.gpt_weights)
        if voice.sovits_weights.exists():
            load_sovits_cached(voice.sovits_weights)
        done.add(voice.gpt_weights)
        print(f"{vid}: GPT and SoVITS ready in the cache ({time.perf_counter() - t0:.1f} s)")
    for m in missing:
        print(f"skipped (file missing) {m}", file=sys.stderr)
    return 0 if done or not missing else 1


def _synthesize_streaming(engine, text, voice, options):
    """Act as a streaming client: print each chunk's latency as it arrives, return the joined audio."""
    from .engine import AudioResult
    from .options import join_audio

    chunks = []
    for chunk in engine.synthesize_stream(text, voice, options, streaming=True):
        chunks.append(chunk)
        print(f"chunk {len(chunks) - 1}: sentence {chunk.sentence_index} #{chunk.chunk_index} "
              f"{chunk.duration:.2f} s of audio at {chunk.timings['elapsed_s'] * 1000:.0f} ms"
              f"{' (final)' if chunk.is_final else ''}", file=sys.stderr, flush=True)
    timings = {"first_chunk_s": chunks[0].timings["elapsed_s"], "total_s": chunks[-1].timings["elapsed_s"]}
    for key in ("frontend_s", "t2s_s", "sovits_s", "tokens"):
        timings[key] = sum(c.timings.get(key, 0.0) for c in chunks)
    result = AudioResult(join_audio(chunks), engine.sample_rate, timings, sentences=chunks[-1].sentence_index + 1)
    timings["rtf"] = timings["total_s"] / max(result.duration, 1e-9)
    return result


BENCH_TEXT = "今天天气不错，我们去公园散步吧。The weather is nice today, let's take a walk."


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench_report import bench_report
    from .engine import Engine

    engine = Engine(args.model_dir)  # this thread owns it: every MLX call below runs here (engine.py)
    voice = engine.registry.get(args.voice)
    report = bench_report(engine, voice, args.text, max_tokens=args.max_tokens, runs=args.runs, seed=args.seed,
                          decode_tokens=args.decode_tokens, precisions=tuple(args.precisions))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(json.dumps(report, ensure_ascii=False, indent=1))
    print(f"\ndecode fp32 {report['decode_ms_per_token_fp32_eager']} ms/token eager, "
          f"{report['decode_ms_per_token_fp32_compiled']} compiled; first audio {report['first_audio_ms']} ms; "
          f"RTF {report['rtf']} — share the JSON line of `gpt-sovits-mlx bench --json` (docs/performance.md)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-sovits-mlx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synthesize", help="speak a text into a WAV file")
    p.add_argument("text", nargs="?", help="text to speak")
    p.add_argument("--text", dest="text_opt", help="alias of the positional TEXT")
    p.add_argument("--voice", default=os.environ.get("VOICE_NAME", "Doubao"))
    p.add_argument("--out", default="out.wav")
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"))
    p.add_argument("--lang", choices=["auto", "zh", "en", "all_zh"], default=None, help="default: the voice's")
    p.add_argument("--speed", type=float, default=None, help="default: the voice's speed factor")
    p.add_argument("--seed", type=int, default=233333)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=None, help="semantic tokens per sentence (25 per second)")
    p.add_argument("--format", choices=["pcm16", "float"], default="pcm16")
    p.add_argument("--stream", action="store_true", help="stream: print each chunk's latency as it arrives")
    p.set_defaults(func=cmd_synthesize)
    p = sub.add_parser("convert", help="convert checkpoints into the cache ahead of time")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--voice", default=os.environ.get("VOICE_NAME", "Doubao"))
    group.add_argument("--all", action="store_true", help="every voice whose files exist")
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"))
    p.add_argument("--coreml", action="store_true",
                   help="also convert HuBERT and RoBERTa to Core ML for the Neural Engine (extra [coreml])")
    p.add_argument("--out", default=None, help="folder for the Core ML packages (default: the cache)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("bench", help="time synthesis of a text on this machine")
    p.add_argument("--text", default=BENCH_TEXT)
    p.add_argument("--voice", default=os.environ.get("VOICE_NAME", "Doubao"))
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"))
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=233333)
    p.add_argument("--max-tokens", type=int, default=None, help="cap per sentence (random smoke weights never stop)")
    p.add_argument("--decode-tokens", type=int, default=150, help="tokens per GPT decode measurement")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--json", action="store_true", help="print one JSON line only (what to share)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("inspect", help="summarise a checkpoint or HF folder without torch")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("voices", help="list built-in voices")
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"))
    p.set_defaults(func=cmd_voices)
    from .download import add_parser as add_download_parser  # huggingface_hub is imported only when it runs

    add_download_parser(sub)
    from .server.serve import add_parser as add_serve_parser  # Starlette and uvicorn only when it runs

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
