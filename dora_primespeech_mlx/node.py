"""Dora node `dora-primespeech-mlx`: the drop-in replacement for dora-primespeech.

This is the only module that imports `dora`. The node is a thin loop over the engine
(`dora_primespeech_mlx.engine`), which lands with issues 9 and 11; until then `main()` refuses to
start with a message that says so, instead of pretending to synthesise.
"""

from __future__ import annotations

import importlib.util
import sys


def engine_available() -> bool:
    return importlib.util.find_spec("dora_primespeech_mlx.engine") is not None


def main() -> int:
    if not engine_available():
        print(
            "dora-primespeech-mlx: the synthesis engine is not part of this build yet "
            "(dora_primespeech_mlx.engine is missing); the node cannot start.",
            file=sys.stderr,
        )
        return 2
    from .engine import run_node  # type: ignore[attr-defined]

    return run_node()


if __name__ == "__main__":
    sys.exit(main())
