"""dora-rs lines for dataflow tests: the test environment's own (1.x) and venvs with older pins.

mofa-studio's Python environment pins dora-rs 0.3.12 and its Rust nodes link dora-node-api 0.4.1; a
plain `pip install dora-rs` brings 1.x. A node must use the dora-rs of the daemon that starts it, so
each line gets a venv with `dora-rs==V`, `dora-rs-cli==V` and this package (editable), cached per
version and pyproject.toml.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import oracle_env  # on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]

# line -> what to install; "current" is the test environment's dora-rs (1.x, see pyproject's test extra)
DORA_LINES = {"0.3": "0.3.12", "0.4": "0.4.1", "1.x": "current"}


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
                for old in venv.parent.glob(f"dora-{version}-venv-*"):  # ~0.6 GB each, for an older pyproject
                    if old != venv:
                        shutil.rmtree(old, ignore_errors=True)
    return venv / "bin"


def dora_bindir(line: str) -> Path:
    """bin/ folder holding `dora`, `python` and `dora-primespeech-mlx` for a line of DORA_LINES."""
    version = DORA_LINES[line]
    return Path(sys.executable).parent if version == "current" else ensure_dora_venv(version)


def dora_version(bindir: Path) -> str:
    """What `dora --version` of that folder says, e.g. "dora-cli 0.3.12"."""
    proc = subprocess.run([str(bindir / "dora"), "--version"], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip()


def check_line(line: str, bindir: Path) -> str:
    """The CLI's version, asserted to belong to `line` (a 1.x test on a 0.x CLI would prove nothing)."""
    said = dora_version(bindir)
    number = said.splitlines()[0].split()[-1] if said else ""  # "dora-cli 0.4.1" (0.4 adds more lines)
    expected = DORA_LINES[line] if DORA_LINES[line] != "current" else "1."
    assert number.startswith(expected), f"dora line {line}: {bindir / 'dora'} says {said!r}"
    return number
