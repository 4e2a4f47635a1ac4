"""Shared fixtures: the oracle-built model directory and its reference outputs.

The oracle (upstream PyTorch GPT-SoVITS) runs in its own virtualenv and process
(tools/oracle/oracle_env.py); tests only read the files it writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "oracle"))

import oracle_env  # noqa: E402


class OracleFixtures:
    """Folder written by tools/oracle/build_fixtures.py."""

    def __init__(self, root: Path):
        self.root = root
        self.model_dir = root / "model_dir"  # a $PRIMESPEECH_MODEL_DIR
        self.moyoyo = self.model_dir / "moyoyo"
        self.gpt_path = self.moyoyo / "GPT_weights" / "doubao-mixed.ckpt"
        self.sovits_path = self.moyoyo / "SoVITS_weights" / "doubao-mixed.pth"
        self.ref_wav = self.moyoyo / "ref_audios" / "doubao_ref_mix_new.wav"
        self.hubert_dir = self.moyoyo / "chinese-hubert-base"
        self.bert_dir = self.moyoyo / "chinese-roberta-wwm-ext-large"
        self._refs = None

    @property
    def refs(self) -> dict[str, np.ndarray]:
        if self._refs is None:
            with np.load(self.root / "refs.npz") as f:
                self._refs = {k: f[k] for k in f.files}
        return self._refs


@pytest.fixture(scope="session")
def oracle_python() -> Path:
    """The oracle virtualenv's python (for tests that need extra reference outputs)."""
    return oracle_env.ensure_venv()


@pytest.fixture(scope="session")
def fixtures() -> OracleFixtures:
    return OracleFixtures(oracle_env.ensure_fixtures())


@pytest.fixture(scope="session")
def refs(fixtures) -> dict[str, np.ndarray]:
    return fixtures.refs


@pytest.fixture(autouse=True)
def _restore_g2pw_state():
    """configure_g2pw sets process-wide state (the frontend's resolver, the status the node logs at
    start-up); a test that calls it must not change what a later test in the same run sees."""
    from dora_primespeech_mlx.text import chinese, g2pw

    resolver, status = chinese._polyphones, g2pw._status
    yield
    chinese._polyphones, g2pw._status = resolver, status
