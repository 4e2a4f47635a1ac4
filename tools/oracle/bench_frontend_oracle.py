"""Upstream side of benchmarks/bench_frontend.py: `text.cleaner.clean_text(..., "v2")` on the same segments.

Runs in the oracle venv, one process per set. Chinese on the pypinyin path (refs_text.py loads
`text.chinese2` with `is_g2pw = False`); English segments that carry `tags` get them instead of nltk's
tagger (which needs downloaded data), as refs_text_en.py does; any other segment that would need the
tagger raises, so an untagged homograph cannot slip into the timing.

    python bench_frontend_oracle.py SET PAYLOAD.json MAX_PASSES MIN_SECONDS

PAYLOAD.json: {"sets": {SET: {"warmup": part, "timed": part}}}, part = {"segments": [[{"lang", "text",
"tags"}, ...], ...]} (one list per line). Prints one JSON object: import_ms, first_call_ms, unseen_ms,
repeat_ms (+ process CPU time), errors.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return 1000 * (time.perf_counter() - t0), 1000 * (time.process_time() - c0)


def _no_tagger(words):
    raise RuntimeError(f"segment needs a POS tag but came without tags: {words}")


def main(argv: list[str]) -> int:
    set_name, payload_path, max_passes, min_seconds = argv[1], Path(argv[2]), int(argv[3]), float(argv[4])
    t0 = time.perf_counter()
    import refs_text  # imports GPT_SoVITS and puts its folder on sys.path

    refs_text._load_chinese2_pypinyin()
    from text.cleaner import clean_text

    from text import english  # every set's warm-up has an English line
    import_ms = 1000 * (time.perf_counter() - t0)
    data = json.loads(payload_path.read_text(encoding="utf-8"))["sets"][set_name]

    def convert(part: str, i: int) -> bool:
        try:
            for seg in data[part]["segments"][i]:
                tags = seg.get("tags")
                english._pos_tag = _no_tagger if tags is None else (lambda words, t=tags: [tuple(x) for x in t])
                clean_text(seg["text"], seg["lang"], "v2")
        except Exception:  # counted; upstream's own failures (e.g. malformed numbers)
            return False
        return True

    n_warm, n_timed = len(data["warmup"]["segments"]), len(data["timed"]["segments"])
    # same protocol as benchmarks/bench_frontend.py: first warm-up line cold, the rest of the warm-up
    # untimed, one pass over the timed lines (unseen), then repeats of it.
    # Upstream prints "... failed" lines from its tone sandhi; keep stdout for the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        first_ms, first_cpu = _timed(lambda: convert("warmup", 0))
        for i in range(1, n_warm):
            convert("warmup", i)
        passes, errors = [], 0
        t_start = time.perf_counter()
        while len(passes) < max_passes and (len(passes) < 2 or time.perf_counter() - t_start < min_seconds):
            failed: list[int] = []
            passes.append(_timed(lambda: failed.extend(i for i in range(n_timed) if not convert("timed", i))))
            errors = len(failed)
    best = min(passes[1:]) if len(passes) > 1 else passes[0]
    print(json.dumps({"import_ms": import_ms, "first_call_ms": first_ms, "first_call_cpu_ms": first_cpu,
                      "unseen_ms": passes[0][0], "unseen_cpu_ms": passes[0][1], "repeat_ms": best[0],
                      "repeat_cpu_ms": best[1], "passes_ms": [p[0] for p in passes], "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
