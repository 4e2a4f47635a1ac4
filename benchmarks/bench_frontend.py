"""Text frontend speed: ms per 100 characters of zh, en and mixed text, ours vs upstream, one run.

    python benchmarks/bench_frontend.py [--max-passes 3] [--min-seconds 3] [--json out.json] [--no-oracle]

Text: the parity corpora in tests/data (zh_corpus.txt, en_corpus.txt, mixed_corpus.txt), lines our
frontend rejects left out. Each line is cut into single-language segments by our `split_languages`
(upstream's detector needs a download, oracle.md 7), and both sides convert the same segments with
`clean_text` (ours: `dora_primespeech_mlx.text.clean_text`; upstream: `text.cleaner.clean_text(...,
"v2")` on its pypinyin path, as tools/oracle/refs_text.py drives it). Ours is also timed end to end
with `text_to_phone_segments(line, "auto")` (splitting, spans, the short-piece retry).

English lines with a homograph need a POS tagger; upstream's (nltk) needs downloaded data that the
oracle lacks, so those lines (plus those of 20 homograph sentences written here that our tagger
tags) form their own set, `homograph`, where upstream is handed our tagger's tags (its time leaves
the tagging out; ours includes it). The other sets contain no homograph: neither side tags there.

Each set's odd lines warm up and its even lines are timed. Every (set, implementation) runs in a
fresh process: `import_ms` is the import, `first_call_ms` the first warm-up line (cold), then the
other warm-up lines run untimed (the second is made-up English words, so every set has the English
G2P and its neural model loaded), then `unseen_ms` is one pass over the timed lines (warm code, text
not converted before) and `repeat_ms` the best further pass over them (repeated text: word caches
help), up to --max-passes or --min-seconds. Figures are wall time; `*_cpu_ms` hold the process CPU
time of the same pass.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, add_json_arg, machine_info, oracle_on_path, wall_cpu_ms, write_report

oracle_on_path()

DATA = ROOT / "tests" / "data"
SETS = ("zh", "en", "mixed", "homograph")
APIS = ("clean_text", "text_to_phone_segments")
OOV_WARMUP = "The blorptastic snergle met a glarbnok."  # no dictionary entry: loads the neural G2P
# the corpora hold few homographs: these make the `homograph` set long enough to time
HOMOGRAPH_SENTENCES = [
    "Please read the record before you record a new one.",
    "The wind was too strong to wind the old clock.",
    "They refuse to take out the refuse on Sunday.",
    "I will present the present to her tomorrow.",
    "The bandage was wound around the wound.",
    "We must polish the Polish furniture before the guests arrive.",
    "He could lead if he would get the lead out.",
    "The insurance was invalid for the invalid.",
    "A bass was painted on the head of the bass drum.",
    "The dove dove into the bushes.",
    "I did not object to the object.",
    "There was a row among the oarsmen about how to row.",
    "They were too close to the door to close it.",
    "The buck does funny things when the does are present.",
    "The farm was used to produce produce.",
    "After a number of injections my jaw got number.",
    "Upon seeing the tear in the painting I shed a tear.",
    "I had to subject the subject to a series of tests.",
    "How can I intimate this to my most intimate friend?",
    "The content of the letter left him content.",
]


def _lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def build_payload(limit: int | None = None) -> dict:
    """{set: {"warmup": part, "timed": part}}, part = {"lines": [...], "segments": [[{"lang", "text", "tags"}]]}.

    Odd lines warm up, even lines are timed (so the timed pass sees text it has not converted yet);
    the second warm-up line is made-up English words, so the neural G2P is loaded before timing.
    """
    from dora_primespeech_mlx.text import english
    from dora_primespeech_mlx.text.cleaner import clean_text
    from dora_primespeech_mlx.text.segment import split_languages

    def segments(line: str, corpus: str) -> tuple[list[dict], bool]:
        spans = [("zh", line)] if corpus == "zh" else [(sp.lang, sp.text) for sp in split_languages(line, "auto")]
        segs, tagged = [], False
        for lang, text in spans:
            clean_text(text, lang)  # lines our frontend rejects (upstream fails on them too) are left out
            tags = english.pos_tags(english.text_normalize(text)) if lang == "en" else None
            tagged |= tags is not None
            segs.append({"lang": lang, "text": text, "tags": None if tags is None else [list(t) for t in tags]})
        return segs, tagged

    rows: dict = {name: [] for name in SETS}
    rejected = 0
    for corpus, source in (("zh", "zh_corpus.txt"), ("en", "en_corpus.txt"), ("mixed", "mixed_corpus.txt")):
        for line in _lines(source):
            try:
                segs, tagged = segments(line, corpus)
            except ValueError:
                rejected += 1
                continue
            rows["homograph" if tagged else corpus].append((line, segs))
    for line in HOMOGRAPH_SENTENCES:
        segs, tagged = segments(line, "en")
        rows["homograph" if tagged else "en"].append((line, segs))
    sets = {}
    for name, items in rows.items():
        if limit is not None:
            items = items[: 2 * limit]
        warm, timed = items[1::2], items[0::2]
        # second in every set's warm-up (the first line is the cold call): any Latin span reaches the
        # English G2P, and made-up words load its neural model
        warm = [*warm[:1], (OOV_WARMUP, segments(OOV_WARMUP, "en")[0]), *warm[1:]]
        sets[name] = {part: {"lines": [ln for ln, _ in rows_], "segments": [sg for _, sg in rows_]}
                      for part, rows_ in (("warmup", warm), ("timed", timed))}
    return {"sets": sets, "rejected_lines": rejected}


def time_passes(convert, n_warm: int, n_timed: int, max_passes: int, min_seconds: float) -> dict:
    """`convert(part, i)` -> True on success. First call = warm-up line 0 (cold), then the other warm-up
    lines, then one pass over the timed lines (warm, unseen text), then repeats of it (repeated text)."""
    first_ms, first_cpu = wall_cpu_ms(lambda: convert("warmup", 0))
    for i in range(1, n_warm):
        convert("warmup", i)
    passes, errors = [], 0
    t_start = time.perf_counter()
    while len(passes) < max_passes and (len(passes) < 2 or time.perf_counter() - t_start < min_seconds):
        failed: list[int] = []
        passes.append(wall_cpu_ms(lambda: failed.extend(i for i in range(n_timed) if not convert("timed", i))))
        errors = len(failed)
    best = min(passes[1:]) if len(passes) > 1 else passes[0]
    return {"first_call_ms": first_ms, "first_call_cpu_ms": first_cpu, "unseen_ms": passes[0][0],
            "unseen_cpu_ms": passes[0][1], "repeat_ms": best[0], "repeat_cpu_ms": best[1],
            "passes_ms": [p[0] for p in passes], "errors": errors}


def worker(set_name: str, api: str, payload_path: Path, max_passes: int, min_seconds: float) -> dict:
    """Ours, in this (fresh) process: import, first line, passes."""
    t0 = time.perf_counter()
    import dora_primespeech_mlx.text.english  # noqa: F401  (as the oracle worker imports upstream's)
    from dora_primespeech_mlx.text.cleaner import clean_text
    from dora_primespeech_mlx.text.frontend import text_to_phone_segments
    import_ms = 1000 * (time.perf_counter() - t0)
    data = json.loads(payload_path.read_text(encoding="utf-8"))["sets"][set_name]

    def convert(part: str, i: int) -> bool:
        try:
            if api == "clean_text":
                for seg in data[part]["segments"][i]:
                    clean_text(seg["text"], seg["lang"])
            else:
                text_to_phone_segments(data[part]["lines"][i], "auto")
        except ValueError:
            return False
        return True

    n_warm, n_timed = len(data["warmup"]["lines"]), len(data["timed"]["lines"])
    return {"import_ms": import_ms, **time_passes(convert, n_warm, n_timed, max_passes, min_seconds)}


def _run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_tables(report: dict) -> None:
    sets = report["sets"]

    def per100(res: dict | None, key: str, chars: int) -> float | None:
        return None if res is None else 100 * res[key] / chars

    def num(x, w=10, fmt=".2f"):
        return f"{x:>{w}{fmt}}" if x is not None else f"{'-':>{w}}"

    print("warm ms per 100 characters of timed text: unseen lines / the same lines repeated")
    print(f"{'set':<11}{'lines':>6}{'chars':>7}{'ours clean_text':>20}{'ours text_to_phone':>22}"
          f"{'upstream clean_text':>24}{'ours/upstr':>12}{'(cpu)':>8}")
    for name, s in sets.items():
        chars = s["chars"]
        ct, fe, orc = s.get("ours_clean_text"), s.get("ours_text_to_phone_segments"), s.get("oracle")
        cells = []
        for res in (ct, fe, orc):
            a, b = per100(res, "unseen_ms", chars), per100(res, "repeat_ms", chars)
            cells.append(f"{num(a, 8)} /{num(b, 8)}")
        ratio = ct["unseen_ms"] / orc["unseen_ms"] if ct and orc else None
        ratio_cpu = ct["unseen_cpu_ms"] / orc["unseen_cpu_ms"] if ct and orc else None
        print(f"{name:<11}{s['lines']:>6}{chars:>7}{cells[0]:>20}{cells[1]:>22}{cells[2]:>24}{num(ratio, 11)}x"
              f"{num(ratio_cpu, 7)}x")
    print()
    print("cold start ms (fresh process): import + first call (one warm-up line)")
    print(f"{'set':<11}{'ours clean_text':>22}{'ours text_to_phone':>22}{'upstream clean_text':>24}")
    for name, s in sets.items():
        cells = []
        for key in ("ours_clean_text", "ours_text_to_phone_segments", "oracle"):
            res = s.get(key)
            cells.append("-" if res is None else f"{res['import_ms']:.0f} + {res['first_call_ms']:.0f}")
        print(f"{name:<11}{cells[0]:>22}{cells[1]:>22}{cells[2]:>24}")
    errs = {f"{n}/{k}": s[k]["errors"] for n, s in sets.items() for k in ("ours_clean_text", "oracle")
            if s.get(k) and s[k]["errors"]}
    if errs:
        print(f"lines that raised (timed anyway): {errs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-passes", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=3.0,
                    help="no further repeat pass once the passes have taken this long (at least one repeat)")
    add_json_arg(ap, "bench_frontend")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--limit", type=int, help="at most this many lines per set (a quick check)")
    ap.add_argument("--worker", nargs=3, metavar=("SET", "API", "PAYLOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        set_name, api, payload = args.worker
        print(json.dumps(worker(set_name, api, Path(payload), args.max_passes, args.min_seconds)))
        return 0

    t_all = time.perf_counter()
    payload = build_payload(args.limit)
    report: dict = {**machine_info(), "rejected_lines": payload["rejected_lines"],
                    "max_passes": args.max_passes, "min_seconds": args.min_seconds, "limit": args.limit,
                    "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload.json"
        path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        for name in SETS:
            data = payload["sets"][name]["timed"]
            entry = {"lines": len(data["lines"]), "chars": sum(map(len, data["lines"])),
                     "segments": sum(map(len, data["segments"])),
                     "warmup_lines": len(payload["sets"][name]["warmup"]["lines"])}
            report["sets"][name] = entry
            if not data["lines"] or not payload["sets"][name]["warmup"]["lines"]:
                continue
            for api in APIS:
                entry[f"ours_{api}"] = _run_json([sys.executable, str(Path(__file__).resolve()), "--worker", name, api,
                                                  str(path), "--max-passes", str(args.max_passes),
                                                  "--min-seconds", str(args.min_seconds)])
            if not args.no_oracle:
                import oracle_env

                proc = oracle_env.run_script(ROOT / "tools/oracle/bench_frontend_oracle.py", name, str(path),
                                             str(args.max_passes), str(args.min_seconds))
                entry["oracle"] = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - t_all
    print_tables(report)
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
