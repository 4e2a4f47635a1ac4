"""The PyTorch oracle: its own virtualenv, and the fixtures it builds (stdlib only).

The upstream implementation (gpt-sovits-cpufast, torch, transformers) conflicts with our runtime
dependencies and must never be imported by the MLX package, so it lives in a separate virtualenv
and runs in its own process. Tests and the demo only read the files it writes.

    python tools/oracle/oracle_env.py venv        # prints the oracle python
    python tools/oracle/oracle_env.py fixtures    # prints the fixture folder (builds it if needed)
    python tools/oracle/oracle_env.py model-dir   # prints the smoke voice's PRIMESPEECH_MODEL_DIR

Both live under $DORA_PRIMESPEECH_MLX_CACHE (default ~/.cache/dora-primespeech-mlx), keyed by the
pinned versions, the builder's source and the seed, so a warm machine reuses them.

Where PyPI cannot be reached, $DORA_PRIMESPEECH_MLX_ORACLE_PYTHON names an existing python with torch
and transformers to use instead of the virtualenv; a wrapper script that puts gpt-sovits-cpufast and
einops (installed with --no-deps --target) on its PYTHONPATH will do (benchmarks/device/gpu_node.sh
`parity`). Unset, nothing changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDER = HERE / "build_fixtures.py"

# Pinned so that random weights and references are reproducible (oracle.md 2, 8).
TORCH = "torch==2.13.0"
TRANSFORMERS = "transformers==5.24.0"
ORACLE_PKG = "gpt-sovits-cpufast==0.1.0"
ORACLE_WHEEL_SHA256 = "b5d6fd23719f9b0b1a4642411280340538440b1f9b5d50657e517aa8c66619be"
ORACLE_DEPS = ["numpy", "einops", "tqdm", "packaging", "pyyaml", "tokenizers", "coremltools==9.0"]
# text-frontend references need these too (g2p_en without deps: its import downloads nltk data)
FRONTEND_DEPS = ["pypinyin==0.55.0", "jieba_fast==0.53", "cn2an==0.5.24", "wordsegment", "inflect", "unidecode", "nltk"]
DEFAULT_SEED = 1234


def cache_root() -> Path:
    root = os.environ.get("DORA_PRIMESPEECH_MLX_CACHE") or Path.home() / ".cache" / "dora-primespeech-mlx"
    return Path(root).expanduser()


def _python_for_oracle() -> str:
    """gpt-sovits-cpufast needs Python >=3.10,<3.13; prefer the running one when it fits."""
    if (3, 10) <= sys.version_info[:2] < (3, 13):
        return sys.executable
    for cand in ("python3.12", "python3.11", "python3.10"):
        path = shutil.which(cand)
        if path:
            return path
    raise RuntimeError("the oracle needs Python 3.10-3.12 on PATH (gpt-sovits-cpufast requires <3.13)")


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def venv_dir() -> Path:
    pins = [TORCH, TRANSFORMERS, ORACLE_PKG, ORACLE_WHEEL_SHA256, *ORACLE_DEPS, *FRONTEND_DEPS, "g2p_en==2.1.0"]
    return cache_root() / f"oracle-venv-{_key(*pins)}"


@contextmanager
def _locked(name: str):
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], **kw) -> None:
    print("[oracle] $", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def external_python() -> Path | None:
    """An existing python with torch, transformers and gpt-sovits-cpufast (e.g. on a GPU machine
    that cannot reach PyPI), named by $DORA_PRIMESPEECH_MLX_ORACLE_PYTHON."""
    value = os.environ.get("DORA_PRIMESPEECH_MLX_ORACLE_PYTHON")
    return Path(value) if value else None


def ensure_venv() -> Path:
    """Create the oracle virtualenv once; return its python."""
    if external_python() is not None:
        return external_python()
    venv = venv_dir()
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    with _locked("oracle-venv"):
        if (venv / ".complete").exists():
            return python
        t0 = time.perf_counter()
        shutil.rmtree(venv, ignore_errors=True)
        _run([_python_for_oracle(), "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        _run(pip + [TORCH, TRANSFORMERS, *ORACLE_DEPS, *FRONTEND_DEPS])
        with tempfile.TemporaryDirectory() as tmp:
            _run([str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                  ORACLE_PKG, "-d", tmp])
            (wheel,) = Path(tmp).glob("*.whl")
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != ORACLE_WHEEL_SHA256:
                raise RuntimeError(f"{wheel.name}: sha256 {digest} != pinned {ORACLE_WHEEL_SHA256}; refusing to use it")
            _run(pip + ["--no-deps", str(wheel), "g2p_en==2.1.0"])
        (venv / ".complete").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    return python


def fixtures_dir(seed: int = DEFAULT_SEED) -> Path:
    key = _key(BUILDER.read_text(), TORCH, TRANSFORMERS, ORACLE_PKG, str(seed), str(external_python() or ""))
    return cache_root() / "fixtures" / f"v2-seed{seed}-{key}"


def ensure_fixtures(seed: int = DEFAULT_SEED) -> Path:
    """Build (once) the oracle model directory and references; return their folder."""
    out = fixtures_dir(seed)
    if (out / "manifest.json").exists():
        return out
    python = ensure_venv()
    with _locked("fixtures"):
        if (out / "manifest.json").exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        _run([str(python), str(BUILDER), str(out), "--seed", str(seed)], env=env)
    return out


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run another oracle script (in the oracle venv), e.g. a test's extra reference builder."""
    python = ensure_venv()
    return subprocess.run([str(python), str(script), *args], check=True, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "fixtures"
    if cmd == "venv":
        print(ensure_venv())
    elif cmd == "fixtures":
        print(ensure_fixtures())
    elif cmd == "model-dir":
        print(ensure_fixtures() / "model_dir")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
