"""The G2PW phrase dictionary that dora-primespeech applies after g2pW, as the MLX frontend ships it.

Runs ONLY with the oracle python (tools/oracle/oracle_env.py):

    python refs_g2pw.py OUT.json.gz

Source: the PyPI wheel gpt-sovits-cpufast 0.1.0, ``GPT_SoVITS/text/g2pw/polyphonic.rep`` then
``polyphonic-fix.rep`` (a later line overrides an earlier one, as upstream's ``read_dict``). Those
two files equal upstream's of 2025 onwards; dora-primespeech's bundled copy (mofa-studio,
commit 8e85f27, 2026-01-23) adds one entry, 熵 → shang1, which is added here. With it the result
equals dora's ``polyphonic.pickle`` entry for entry (45,047 words), which its ``get_dict`` loads.

Output: gzip of a JSON object {word: "py1 py2 ..."} (TONE3 readings, space-separated), keys in
file order.
"""

from __future__ import annotations

import ast
import gzip
import json
import sys
from pathlib import Path

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path)
import text  # noqa: E402

# dora-primespeech's own addition (its commit "fix: Add 熵 (shang1) to G2PW polyphonic dictionary")
DORA_EXTRA = {"熵": ["shang1"]}


def read_phrases() -> dict[str, list[str]]:
    folder = Path(text.__file__).resolve().parent / "g2pw"
    table: dict[str, list[str]] = {}
    for name in ("polyphonic.rep", "polyphonic-fix.rep"):
        for n, line in enumerate((folder / name).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            key, value = line.split(":")
            readings = ast.literal_eval(value.strip())  # upstream eval()s it; the values are list literals
            if not (isinstance(readings, list) and all(isinstance(r, str) and " " not in r for r in readings)):
                raise ValueError(f"{folder / name}:{n}: unexpected value {value!r}")
            table[key.strip()] = readings
    table.update(DORA_EXTRA)
    return table


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    table = read_phrases()
    payload = json.dumps({k: " ".join(v) for k, v in table.items()}, ensure_ascii=False, separators=(",", ":"))
    # mtime=0: the same table gives the same bytes
    Path(argv[0]).write_bytes(gzip.compress(payload.encode("utf-8"), compresslevel=9, mtime=0))


if __name__ == "__main__":
    main(sys.argv[1:])
