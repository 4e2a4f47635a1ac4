"""`gpt-sovits-mlx`: command-line tools over the engine.

Subcommands available now:
  inspect PATH   read a GPT .ckpt, SoVITS .pth or HF model folder without torch and summarise it
  voices         list the built-in voices and whether their files exist under a model directory
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, load_hf_weights, read_torch_file, to_plain

REPO_VOICES = Path(__file__).resolve().parents[1] / "voices" / "builtin.json"


def _summarise_state(state: dict) -> dict:
    dtypes = Counter(str(v.dtype) for v in state.values() if isinstance(v, np.ndarray))
    params = sum(int(v.size) for v in state.values() if isinstance(v, np.ndarray))
    return {"tensors": len(state), "parameters": params, "dtypes": dict(dtypes)}


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(os.path.expandvars(os.path.expanduser(args.path)))
    if path.is_dir():
        summary = {"path": str(path), "kind": "hf-folder", **_summarise_state(load_hf_weights(path))}
        cfg = path / "config.json"
        if cfg.exists():
            summary["model_type"] = json.loads(cfg.read_text()).get("model_type")
    else:
        ckpt = read_torch_file(path)
        obj = ckpt.obj
        summary = {"path": str(path), "archive_folder": ckpt.archive_folder, "version_tag": ckpt.version_tag}
        if isinstance(obj, dict) and "weight" in obj:
            summary.update(kind="gpt-sovits-checkpoint", info=obj.get("info"), **_summarise_state(obj["weight"]))
            config = to_plain(obj.get("config") or {})
            summary["config_model"] = config.get("model")
        else:
            summary.update(kind="state-dict", **_summarise_state(obj))
    print(json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    registry = json.loads(REPO_VOICES.read_text())
    model_dir = Path(os.path.expandvars(os.path.expanduser(args.model_dir))) if args.model_dir else None
    for voice in registry["voices"]:
        status = ""
        if model_dir is not None:
            moyoyo = model_dir / "moyoyo"
            missing = [k for k in ("gpt_weights", "sovits_weights", "reference_audio") if not (moyoyo / voice[k]).exists()]
            status = "ok" if not missing else "missing " + ", ".join(missing)
        print(f"{voice['id']:<12} {voice['text_lang']:<3} speed {voice['speed_factor']:<4} {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-sovits-mlx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a checkpoint or HF folder without torch")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("voices", help="list built-in voices")
    p.add_argument("--model-dir", default=os.environ.get("PRIMESPEECH_MODEL_DIR"))
    p.set_defaults(func=cmd_voices)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
