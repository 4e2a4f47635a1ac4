"""One entry point for the benchmarks: list them, or run one by name with its own arguments.

    python benchmarks/run.py                      # the names, each with its one-line description
    python benchmarks/run.py NAME [ARGS...]       # e.g. python benchmarks/run.py t2s --runs 3
    python benchmarks/run.py NAME --help          # that benchmark's options

Each script also still runs on its own (`python benchmarks/bench_t2s.py ...`).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXTRA = {"fuzz": "fuzz_checkpoints", "soak": "node_soak", "parity": "parity_report"}


def benchmarks() -> dict[str, str]:
    """Name -> module: every bench_*.py under its name without `bench_`, plus the extra scripts."""
    names = {p.stem.removeprefix("bench_"): p.stem for p in sorted(HERE.glob("bench_*.py"))}
    names.update(EXTRA)
    return names


def summary(module: str) -> str:
    """The first line of a script's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse((HERE / f"{module}.py").read_text(encoding="utf-8"))) or ""
    return doc.strip().split("\n")[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.split("\n")[0] + "\n")
        width = max(map(len, names))
        for name, module in names.items():
            print(f"  {name:<{width}}  {summary(module)}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    module = names[name]
    sys.argv = [str(HERE / f"{module}.py"), *args]  # argparse's usage line names the script
    return importlib.import_module(module).main(args)


if __name__ == "__main__":
    sys.exit(main())
