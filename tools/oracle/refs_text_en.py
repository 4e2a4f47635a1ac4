"""English / mixed-language / sentence-splitting references from upstream (gpt-sovits-cpufast 0.1.0).

Runs ONLY with the oracle python (tools/oracle/oracle_env.py). Upstream's language detector needs a
download and misdetects (oracle.md 7), so segments are given explicitly, as (language, text) pairs.

    python refs_text_en.py IN.json OUT.json       # segment lists and split inputs, see below
    python refs_text_en.py --dump-tables DIR      # the English dictionaries the MLX frontend ships

IN.json: {"segments": [[{"lang": "en"|"zh", "text": str, "tags": [[word, tag], ...] | null}, ...], ...],
          "split": [str, ...]}
OUT.json: {"segments": [[{"phones", "word2ph", "norm_text", "ids"} | {"error"}, ...], ...],
           "split": [{"collapse": str, "cut5": str, "pre_seg": {"zh": [...] | {"error"}, "en": ...}}
           (pre_seg is pre_seg_text applied to the collapsed text, as preprocess() does), ...]}

"tags": nltk's POS tagger needs downloaded data, which the oracle does not have; when a segment
contains a homograph the test passes the tags its own tagger produced, so upstream's pronunciation
choice is checked for the same tags (the tagger itself is checked separately).
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import refs_text  # noqa: E402  (imports GPT_SoVITS and puts its folder on sys.path)


def _english():
    from text import english

    return english


def _run_segments(items: list[list[dict]]) -> list[list[dict]]:
    refs_text._load_chinese2_pypinyin()
    from text import cleaned_text_to_sequence
    from text.cleaner import clean_text

    english = _english()
    out = []
    for segs in items:
        row = []
        for seg in segs:
            tags = seg.get("tags")
            if tags is not None:
                given = [tuple(t) for t in tags]

                def fake_pos_tag(words, given=given):
                    if [w for w, _ in given] != list(words):
                        raise RuntimeError(f"given tags {given} do not match the tokens {words}")
                    return given

                english._pos_tag = fake_pos_tag
            else:
                english._pos_tag = None
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    phones, word2ph, norm = clean_text(seg["text"], seg["lang"], "v2")
                row.append(
                    {
                        "phones": list(phones),
                        "word2ph": None if word2ph is None else [int(x) for x in word2ph],
                        "norm_text": norm,
                        "ids": [int(i) for i in cleaned_text_to_sequence(phones, "v2")],
                    }
                )
            except Exception as e:  # recorded; the test decides whether an error is expected
                row.append({"error": f"{type(e).__name__}: {e}"})
        out.append(row)
    return out


def _splitter_namespace() -> dict:
    """Upstream's splitting functions without importing TextPreprocessor (it needs torch + a detector).

    The functions are taken from the module source by name and run unchanged.
    """
    import importlib.util

    import GPT_SoVITS

    pack = Path(GPT_SoVITS.__file__).resolve().parent / "TTS_infer_pack"
    # by path: the package __init__ imports TTS.py, which needs PyAV and torch
    spec = importlib.util.spec_from_file_location("_oracle_tsm", pack / "text_segmentation_method.py")
    tsm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tsm)
    src_path = pack / "TextPreprocessor.py"
    tree = ast.parse(src_path.read_text(encoding="utf-8"))
    wanted_funcs = {"get_first", "merge_short_text_in_array"}
    wanted_methods = {"pre_seg_text", "filter_text", "replace_consecutive_punctuation"}
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted_funcs]
    for n in tree.body:
        if isinstance(n, ast.ClassDef) and n.name == "TextPreprocessor":
            nodes += [m for m in n.body if isinstance(m, ast.FunctionDef) and m.name in wanted_methods]
    found = {n.name for n in nodes}
    if found != wanted_funcs | wanted_methods:
        raise RuntimeError(f"{src_path}: missing {sorted((wanted_funcs | wanted_methods) - found)}")
    ns: dict = {
        "re": re,
        "splits": tsm.splits,
        "split_big_text": tsm.split_big_text,
        "get_seg_method": tsm.get_method,
        "i18n": lambda s: s,
        "punctuation": {"!", "?", "…", ",", ".", "-"},
        "List": list,
        "Dict": dict,
        "Tuple": tuple,
    }
    for n in nodes:
        n.decorator_list = []
        mod = ast.Module(body=[n], type_ignores=[])
        ast.fix_missing_locations(mod)
        exec(compile(mod, str(src_path), "exec"), ns)

    class Stub:
        def _maybe_log(self, *args):
            pass

    for name in wanted_methods:
        setattr(Stub, name, ns[name])
    ns["stub"] = Stub()
    ns["cut5"] = tsm.get_method("cut5")
    return ns


def _run_split(texts: list[str]) -> list[dict]:
    ns = _splitter_namespace()
    stub = ns["stub"]
    out = []
    for t in texts:
        collapsed = stub.replace_consecutive_punctuation(t)
        row: dict = {"collapse": collapsed, "cut5": ns["cut5"](t)}
        pre = {}
        for lang in ("zh", "en"):
            try:  # as preprocess() does: collapse first, then pre_seg_text
                pre[lang] = stub.pre_seg_text(collapsed, lang, "cut5")
            except Exception as e:
                pre[lang] = {"error": f"{type(e).__name__}: {e}"}
        row["pre_seg"] = pre
        out.append(row)
    return out


def _dump_tables(out_dir: Path) -> None:
    """The effective dictionaries of upstream's live English G2P, as gzipped TSV files.

    ``en_cmudict.tsv.gz``: upstream's ``engdict_cache.pickle`` plus ``engdict-hot.rep`` overrides
    minus the abbreviations it deletes; ``en_names.tsv.gz``: ``namedict_cache.pickle``. One line per
    word: ``word<TAB>phones joined by single spaces`` (a few entries start with an empty phone, which
    the single-space join keeps). Only the first pronunciation is stored: upstream reads only [0].
    """
    english = _english()
    g2p = english._g2p
    for name, table in (("en_cmudict.tsv.gz", g2p.cmu), ("en_names.tsv.gz", g2p.namedict)):
        lines = []
        for word, prons in table.items():
            ph = prons[0]
            assert "\t" not in word and "\n" not in word and all(" " not in p for p in ph), word
            lines.append(f"{word}\t{' '.join(ph)}\n")
        data = "".join(lines).encode("utf-8")
        (out_dir / name).write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--dump-tables":
        out_dir = Path(argv[1])
        out_dir.mkdir(parents=True, exist_ok=True)
        _dump_tables(out_dir)
        return
    if len(argv) != 2:
        raise SystemExit(__doc__)
    payload = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = {
        "segments": _run_segments(payload.get("segments", [])),
        "split": _run_split(payload.get("split", [])),
    }
    Path(argv[1]).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
