"""The plumbing every benchmark shares: report header, timing, memory, JSON output, paths.

Scripts import it as `from harness import ...` (benchmarks/ is on sys.path whether a script runs
directly or through benchmarks/run.py). Nothing heavy is imported at module level: MLX is imported
only by `machine_info`, so subprocess workers that never call it stay light.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"


def machine_info() -> dict:
    """The report header: machine, processor, Python, MLX version and device, package version."""
    import mlx.core as mx

    import dora_primespeech_mlx

    return {"machine": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "mlx": mx.__version__, "device": str(mx.default_device()),
            "dora_primespeech_mlx": dora_primespeech_mlx.__version__}


def timed(fn: Callable[[], object], runs: int, warmup: int = 1, before: Callable[[], object] | None = None) -> dict:
    """Call `fn` `warmup` times, then `runs` timed times (`before`, e.g. `mx.synchronize`, runs
    untimed ahead of each timed call). Seconds: median, min, every run, and each warm-up call."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(runs):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times, "warmup_s": warm}


def wall_cpu_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call: CPU time shows how much of the wall time was computing."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Resident set size of this process now, MB (1e6 bytes); the peak where /proc is missing (macOS)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb() * 1.048576  # MiB -> MB, as the /proc figure


def add_json_arg(parser, name: str) -> None:
    """The `--json PATH` option every benchmark has, defaulting to out/NAME.json."""
    parser.add_argument("--json", type=Path, default=OUT / f"{name}.json", help="where the JSON report goes")


def write_report(report: dict, path: Path) -> None:
    """Write `report` as JSON (indent 1, UTF-8) to `path`, creating its folders; say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"JSON: {path}")


def oracle_on_path() -> None:
    """Make tools/oracle importable (`import oracle_env`)."""
    path = str(ROOT / "tools" / "oracle")
    if path not in sys.path:
        sys.path.insert(0, path)


def support_on_path() -> None:
    """Make tests/support importable (`tiny_models`, `ckpt_craft`)."""
    path = str(ROOT / "tests" / "support")
    if path not in sys.path:
        sys.path.insert(0, path)
