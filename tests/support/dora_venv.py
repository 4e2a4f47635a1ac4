"""A virtualenv with this package and an older dora-rs (mofa-studio pins 0.3.12), for dataflow tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import oracle_env  # on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]


def ensure_dora_venv(version: str) -> Path:
    """bin/ folder of a venv with `dora-rs==version`, `dora-rs-cli==version` and this package (editable)."""
    key = hashlib.sha256((version + (ROOT / "pyproject.toml").read_text()).encode()).hexdigest()[:12]
    venv = oracle_env.cache_root() / f"dora-{version}-venv-{key}"
    marker = venv / ".complete"
    if not marker.exists():
        with oracle_env._locked(f"dora-{version}"):
            if not marker.exists():
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
                pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
                subprocess.run(pip + ["-e", str(ROOT), f"dora-rs=={version}", f"dora-rs-cli=={version}"], check=True)
                marker.write_text(version)
    return venv / "bin"
