"""Core ML (Neural Engine) versions of the two frozen encoders, CNHubert and RoBERTa.

- `convert_coreml(model_dir, out_dir)`: write `hubert.mlpackage` + `bert.mlpackage` (fp16,
  channels-first, enumerated sequence buckets). The PyTorch work runs in a subprocess
  (`python -m dora_primespeech_mlx_torch.coreml_convert`) with a python that has the `[coreml]`
  extra, so this process never imports torch.
- `runtime.load_coreml_encoders(...)`: on macOS with `USE_ANE=1`, the compiled packages behind the
  same call signatures as the MLX encoders; `None` (and one log line saying why) anywhere else.

Stdlib only at import time: the conversion process imports `spec` from here without mlx.
See docs/coreml.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..constants import cache_home
from . import spec

logger = logging.getLogger(__name__)

__all__ = ["convert_coreml", "default_coreml_dir", "moyoyo_dir", "spec"]


def moyoyo_dir(model_dir: str | Path) -> Path:
    """The folder holding the encoders: `model_dir/moyoyo` for a $PRIMESPEECH_MODEL_DIR, else `model_dir`."""
    model_dir = Path(model_dir).expanduser()
    return model_dir / "moyoyo" if (model_dir / "moyoyo").is_dir() else model_dir


def default_coreml_dir(model_dir: str | Path) -> Path:
    """Where converted packages live: `$DORA_PRIMESPEECH_MLX_CACHE/coreml/<key of the model folder>`.

    A cache folder rather than the model folder, which may be read-only or shared; the key is the
    resolved path, so two model folders never share packages.
    """
    key = hashlib.sha256(str(moyoyo_dir(model_dir).resolve()).encode()).hexdigest()[:16]
    return cache_home() / "coreml" / key


def convert_coreml(model_dir: str | Path, out_dir: str | Path | None = None, *,
                   models: Sequence[str] = ("hubert", "bert"),
                   hubert_seconds: Sequence[int] = spec.HUBERT_BUCKET_SECONDS,
                   bert_lengths: Sequence[int] = spec.BERT_BUCKETS, python: str | Path | None = None) -> dict:
    """Convert the encoders under `model_dir` to Core ML packages in `out_dir`; return the manifest.

    `model_dir` is a $PRIMESPEECH_MODEL_DIR (or its `moyoyo/` folder) holding `chinese-hubert-base/`
    and `chinese-roberta-wwm-ext-large/`. `out_dir` defaults to `default_coreml_dir(model_dir)`, where
    the runtime looks. `python` (default: this interpreter, or $DORA_PRIMESPEECH_MLX_CONVERT_PYTHON)
    must have torch and coremltools: `pip install 'dora-primespeech-mlx[coreml]'`. Works on Linux and
    macOS; only running the packages needs macOS. Raises RuntimeError with the converter's output
    when it fails.
    """
    moyoyo = moyoyo_dir(model_dir)
    for folder in ("chinese-hubert-base", "chinese-roberta-wwm-ext-large"):
        if not (moyoyo / folder).is_dir():
            raise FileNotFoundError(f"{moyoyo / folder}: missing; pass the PrimeSpeech model directory "
                                    "(the one holding moyoyo/) as model_dir")
    out = Path(out_dir) if out_dir is not None else default_coreml_dir(model_dir)
    python = str(python or os.environ.get("DORA_PRIMESPEECH_MLX_CONVERT_PYTHON") or sys.executable)
    # the converter imports both packages from wherever this one is installed (or checked out)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [python, "-m", "dora_primespeech_mlx_torch.coreml_convert", str(moyoyo), str(out),
           "--models", ",".join(models), "--hubert-seconds", ",".join(map(str, hubert_seconds)),
           "--bert-lengths", ",".join(map(str, bert_lengths))]
    logger.info("converting %s to Core ML in %s (a few minutes for RoBERTa-large)", moyoyo, out)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        hint = ""
        if "No module named 'torch'" in proc.stderr or "No module named 'coremltools'" in proc.stderr:
            hint = f" ({python} lacks the conversion tools: pip install 'dora-primespeech-mlx[coreml]')"
        raise RuntimeError(f"Core ML conversion failed{hint}:\n" + "\n".join(tail))
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    logger.info("Core ML packages written to %s in %.1f s", out, time.perf_counter() - t0)
    return manifest
