"""Chinese text-frontend references from upstream (gpt-sovits-cpufast 0.1.0), pypinyin path.

Runs ONLY with the oracle python (tools/oracle/oracle_env.py). `text.chinese2` hard-codes
`is_g2pw = True` and would download G2PW weights at import, so its source is executed with
`is_g2pw = False` as `sys.modules["text.chinese2"]` (oracle.md 7): the pypinyin fallback plus
tone sandhi and erhua, exactly what `clean_text(text, "zh", "v2")` then uses.

    python refs_text.py IN.json OUT.json          # IN: list of strings
    python refs_text.py --dump-tables DIR         # data tables the MLX frontend ships (JSON files)

OUT.json for sentences: a list of {"phones", "word2ph", "norm_text", "ids"} or {"error": "..."}
in input order. Upstream prints "... failed" from swallowed exceptions in its tone sandhi; those
lines go to stderr here so stdout stays clean.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import types
from pathlib import Path

import GPT_SoVITS  # noqa: F401  (puts its folder on sys.path: `text` becomes importable)
import text  # noqa: E402


def _load_chinese2_pypinyin() -> types.ModuleType:
    src_path = Path(text.__file__).resolve().parent / "chinese2.py"
    source = src_path.read_text(encoding="utf-8")
    patched, n = re.subn(r"^is_g2pw = True\b", "is_g2pw = False", source, flags=re.M)
    if n != 1:
        raise RuntimeError(f"expected one 'is_g2pw = True' line in {src_path}, found {n}")
    mod = types.ModuleType("text.chinese2")
    mod.__file__ = str(src_path)
    sys.modules["text.chinese2"] = mod
    text.chinese2 = mod
    exec(compile(patched, str(src_path), "exec"), mod.__dict__)
    return mod


def _run_sentences(sentences: list[str]) -> list[dict]:
    _load_chinese2_pypinyin()
    from text import cleaned_text_to_sequence
    from text.cleaner import clean_text

    out = []
    for s in sentences:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                phones, word2ph, norm = clean_text(s, "zh", "v2")
            out.append(
                {
                    "phones": list(phones),
                    "word2ph": None if word2ph is None else [int(x) for x in word2ph],
                    "norm_text": norm,
                    "ids": [int(i) for i in cleaned_text_to_sequence(phones, "v2")],
                }
            )
        except Exception as e:  # recorded: our frontend must raise ValueError on the same input
            out.append({"error": f"{type(e).__name__}: {e}"})
    return out


def _dump_tables() -> dict[str, object]:
    """Upstream data tables read from its live objects, as the files the MLX frontend ships.

    Returns {file name: JSON content} for dora_primespeech_mlx/text/data/. Generated once and
    committed; tests/test_text_zh.py checks the shipped files still equal this dump.
    """
    from text import symbols as s1
    from text import symbols2 as s2

    c2 = _load_chinese2_pypinyin()
    from text.zh_normalization import char_convert

    assert list(s2.symbols[: len(s1.symbols)]) == list(s1.symbols)
    # upstream builds its dict pair by pair, so a repeated traditional char keeps the last pair
    t2s: dict[str, str] = {}
    for simp, trad in zip(char_convert.simplified_charcters, char_convert.traditional_characters):
        t2s[trad] = simp
    ts = c2.tone_modifier
    return {
        "symbols_v2.json": {"v1_size": len(s1.symbols), "symbols": list(s2.symbols)},
        "opencpop_strict.json": {k: v.split(" ") for k, v in c2.pinyin_to_symbol_map.items()},
        "zh_words.json": {
            "must_neural_tone_words": sorted(ts.must_neural_tone_words),
            "must_not_neural_tone_words": sorted(ts.must_not_neural_tone_words),
            "must_erhua": sorted(c2.must_erhua),
            "not_erhua": sorted(c2.not_erhua),
        },
        "zh_t2s.json": {t: s for t, s in t2s.items() if t != s},
    }


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--dump-tables":
        out_dir = Path(argv[1])
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, content in _dump_tables().items():
            (out_dir / name).write_text(json.dumps(content, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    if len(argv) == 2:
        sentences = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        result = _run_sentences(sentences)
        out_path = argv[1]
    else:
        raise SystemExit(__doc__)
    Path(out_path).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
