"""Run tools/oracle/refs_text_en.py once per payload and cache its JSON under the cache root."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import oracle_env  # on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = (ROOT / "tools" / "oracle" / "refs_text_en.py", ROOT / "tools" / "oracle" / "refs_text.py")


def oracle_text_en(request, payload: dict) -> dict:
    """Oracle output for ``payload`` (see refs_text_en.py); the venv is only needed on a cache miss."""
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True)
    key_src = blob + "".join(p.read_text() for p in SCRIPTS) + oracle_env.ORACLE_PKG
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = oracle_env.cache_root() / "text-refs" / f"en-{key}.json"
    if not out.exists():
        python = request.getfixturevalue("oracle_python")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_in = out.with_name(out.name + f".in{os.getpid()}")
        tmp_out = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp_in.write_text(blob, encoding="utf-8")
        try:
            subprocess.run([str(python), str(SCRIPTS[0]), str(tmp_in), str(tmp_out)], check=True,
                           capture_output=True)
            tmp_out.rename(out)
        finally:
            tmp_in.unlink(missing_ok=True)
    return json.loads(out.read_text(encoding="utf-8"))
