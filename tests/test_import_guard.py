"""The engine never imports torch, transformers or dora; only the Dora adapter may import dora."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # oracle-free and quick: part of `pytest -m fast`

PKG = Path(__file__).resolve().parents[1] / "dora_primespeech_mlx"
FORBIDDEN = {"torch", "transformers", "dora"}
ADAPTER = PKG / "node.py"  # the only module allowed to import dora


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_engine_sources_do_not_import_forbidden_modules():
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        allowed = {"dora"} if path == ADAPTER else set()
        bad = (_imported_roots(path) & FORBIDDEN) - allowed
        if bad:
            offenders[str(path.relative_to(PKG.parent))] = sorted(bad)
    assert not offenders, f"forbidden imports: {offenders}"


def test_importing_the_engine_loads_no_forbidden_module():
    # Import every engine module in a fresh interpreter and look at sys.modules.
    modules = sorted(
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PKG.rglob("*.py")
        if p != ADAPTER
    )
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in "
        f"{sorted(FORBIDDEN)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_guard_would_catch_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom torch import nn\nimport transformers.models\n")
    assert _imported_roots(bad) & FORBIDDEN == {"torch", "transformers"}
