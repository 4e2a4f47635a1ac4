"""Chinese text frontend: symbol tables, clean_text parity with upstream, robustness.

The oracle is upstream's own frontend (gpt-sovits-cpufast 0.1.0 `clean_text(text, "zh", "v2")`
on its pypinyin path), run by tools/oracle/refs_text.py in the oracle virtualenv. Its JSON output
is cached under the oracle cache root, keyed by the corpus and the script, so reruns are fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dora_primespeech_mlx.text import clean_text, cleaned_text_to_sequence, symbols, symbols_v1

ROOT = Path(__file__).resolve().parents[1]
REFS_SCRIPT = ROOT / "tools" / "oracle" / "refs_text.py"
DATA_DIR = ROOT / "dora_primespeech_mlx" / "text" / "data"
CORPUS_FILE = Path(__file__).parent / "data" / "zh_corpus.txt"

sys.path.insert(0, str(ROOT / "tools" / "oracle"))
import oracle_env  # noqa: E402


# ---------------------------------------------------------------------------------------------
# corpus


def _handwritten() -> list[str]:
    lines = CORPUS_FILE.read_text(encoding="utf-8").split("\n")
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _constructed() -> list[str]:
    """Cases a one-line file cannot hold, plus sweeps over the number rules."""
    long_text = "".join(_handwritten()[150:200]) * 2  # ~1,000 characters in one segment
    cases = [
        long_text,
        "第一行\n第二行\n\n第三行",
        "",
        "。",
        "，，，！！？？……",
        "abc",
        "1234567890",
        "-0.5",
        "100%",
        "3.",
        ".",
        "儿",
        "一",
        "不",
        "一不一不",
    ]
    cases += [f"我有{n}个苹果。" for n in (0, 1, 2, 10, 11, 20, 101, 110, 1001, 10010, 100000, 20000000, 123456789)]
    cases += [f"共{n}元" for n in ("0.0", "0.50", "12.30", "-4", "1e5", "3.14.15", "007", "10086")]
    cases += [f"{h}:{m}" for h, m in (("0", "00"), ("9", "05"), ("13", "30"), ("23", "59"), ("24", "00"))]
    return cases


def _fuzz_symbols(seed: int, n: int) -> list[str]:
    """Random strings over the characters the normaliser and g2p treat specially."""
    rng = random.Random(seed)
    han = (
        "一不儿个了的我你他好很小老五九有买水雨展米土比马朵里上下来去们子吧啊呢行长重乐还都地得"
        "会朝单觉看听说走玩花孩事点门哪这那几两半第零二三四百千万亿年月日号时分秒元块度人本条天嗯呣哼呒欸"
    )
    pieces = (
        list(han) * 3
        + list("0123456789") * 4
        + list(".-/%:~+×÷=") * 2
        + list("，。！？、；：…—～·“”《》（）")
        + ["...", "\n", " ", "\u3000", "\t"]
        + list("abcxyzABCms")
        + list("αβπΩ²³ⁿ①②０１２３４５６７８９")
        + list("￥^@#&_|\\$")
        + ["٣", "🙂", "é", "ㄱ", "あ", "\u9fa6", "\u3400", "〇", "𠀀", "噷"]
    )
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _fuzz_words(seed: int, n: int) -> list[str]:
    """Concatenations of random dictionary words: stresses segmentation, sandhi and erhua."""
    import jieba

    rng = random.Random(seed)
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as f:
        words = [ln.split(" ", 1)[0] for ln in f]
    words = [w for w in words if all("\u4e00" <= c <= "\u9fa5" for c in w)]
    out = []
    for _ in range(n):
        s = ""
        for _ in range(rng.randint(3, 15)):
            s += rng.choice(words)
            if rng.random() < 0.15:
                s += rng.choice("，。！？、…")
        out.append(s)
    return out


def _corpus() -> list[str]:
    return _handwritten() + _constructed() + _fuzz_symbols(1, 300) + _fuzz_words(5, 300)


# ---------------------------------------------------------------------------------------------
# oracle


def _cached_oracle(request, tag: str, args_for: callable, payload: str) -> Path:
    """Run refs_text.py once per (payload, script) and keep its output under the cache root."""
    key = hashlib.sha256((payload + REFS_SCRIPT.read_text() + oracle_env.ORACLE_PKG).encode()).hexdigest()[:16]
    out = oracle_env.cache_root() / "text-refs" / f"{tag}-{key}"
    if not out.exists():
        python = request.getfixturevalue("oracle_python")  # only built/checked on a cache miss
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        args = args_for(tmp)
        subprocess.run([str(python), str(REFS_SCRIPT), *args], check=True, capture_output=True)
        tmp.rename(out)
        for extra in tmp.parent.glob(tmp.name.split(".tmp")[0] + ".in.json"):
            extra.unlink()
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def oracle_results(request, corpus) -> list[dict]:
    payload = json.dumps(corpus, ensure_ascii=False)

    def args_for(tmp: Path) -> list[str]:
        inp = tmp.with_suffix(".in.json")
        inp.write_text(payload, encoding="utf-8")
        return [str(inp), str(tmp)]

    out = _cached_oracle(request, "zh", args_for, payload)
    results = json.loads(out.read_text(encoding="utf-8"))
    assert len(results) == len(corpus)
    return results


# ---------------------------------------------------------------------------------------------
# symbol tables


def test_symbol_tables_and_ids():
    assert len(symbols) == 732 and symbols_v1 == symbols[:322]
    known = {"!": 0, ",": 1, "-": 2, ".": 3, "?": 4, "SP": 77, "SP2": 78, "SP3": 79, "UNK": 86, "_": 95, "…": 321}
    assert {s: symbols.index(s) for s in known} == known
    assert symbols[322:324] == ["[", "]"] and symbols[-1].startswith("Y")
    # 你好，世界。 from the oracle (oracle.md 7)
    phones = "n i2 h ao3 , sh ir4 j ie4 .".split()
    assert cleaned_text_to_sequence(phones) == [227, 167, 158, 119, 1, 251, 214, 221, 194, 3]
    assert cleaned_text_to_sequence(phones, "v1") == cleaned_text_to_sequence(phones, "v2")
    with pytest.raises(ValueError, match="not in the v2 symbol table"):
        cleaned_text_to_sequence(["n", "xx9"])
    with pytest.raises(ValueError, match="not in the v1 symbol table"):
        cleaned_text_to_sequence(["Y" + "a1"], "v1")
    with pytest.raises(ValueError, match="unknown symbol-table version"):
        cleaned_text_to_sequence(["n"], "v3")


def test_shipped_tables_equal_upstream(request):
    """The JSON tables in the package are exactly what upstream's live objects hold."""
    out = _cached_oracle(request, "tables", lambda tmp: ["--dump-tables", str(tmp)], "tables")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in DATA_DIR.glob("*.json"))
    for name in names:
        assert json.loads((DATA_DIR / name).read_text("utf-8")) == json.loads((out / name).read_text("utf-8")), name


# ---------------------------------------------------------------------------------------------
# clean_text


@pytest.mark.parametrize(
    "text, norm, phones, word2ph",
    [
        ("你好，世界。", "你好,世界.", "n i2 h ao3 , sh ir4 j ie4 .", [2, 2, 1, 2, 2, 1]),
        ("有点贵", "有点贵", "y ou2 d ian3 g ui4", [2, 2, 2]),  # 3-3 sandhi
        ("小孩儿在胡同儿里玩儿", None, "x iao3 h ai2 EE er2 z ai4 h u2 t ong5 EE er5 l i3 w an2 EE er2", None),
        ("看一看，不要不好意思。", None, "k an4 y i5 k an4 , b u2 y ao4 b u4 h ao3 y i4 s i05 .", None),
        # ￥ turns every comma into SP2
        (
            "你好￥世界，再见", "你好,世界,再见",
            "n i2 h ao3 SP2 sh ir4 j ie4 SP2 z ai4 j ian4",
            [2, 2, 1, 2, 2, 1, 2, 2],
        ),
    ],
)
def test_clean_text_goldens(text, norm, phones, word2ph):
    """Upstream outputs (recorded from the oracle) that need no oracle to check."""
    got_phones, got_w2p, got_norm = clean_text(text, "zh")
    assert got_phones == phones.split()
    assert norm is None or got_norm == norm
    assert word2ph is None or got_w2p == word2ph


def test_normaliser_goldens():
    _, _, norm = clean_text("2024年3月15日，气温是-3.5℃。", "zh")
    assert norm == "二零二四年三月十五日,气温是零下三点五度."
    assert clean_text("我的手机号是13812345678。")[2] == "我的手机号是幺三八幺二三四五六七八."
    assert clean_text("及格率是85%，有3/4的人。")[2] == "及格率是百分之八十五,有四分之三的人."


def test_clean_text_matches_upstream(corpus, oracle_results):
    """Identical phones, word2ph, normalised text and ids on every sentence; upstream failures
    (AssertionError/IndexError/KeyError there) are a ValueError here."""
    mismatches = []
    n_ok = 0
    for text, ref in zip(corpus, oracle_results):
        try:
            phones, word2ph, norm = clean_text(text, "zh")
            ours = {"phones": phones, "word2ph": word2ph, "norm_text": norm, "ids": cleaned_text_to_sequence(phones)}
        except ValueError as e:
            ours = {"error": str(e)}
        if "error" in ref or "error" in ours:
            if ("error" in ref) != ("error" in ours):
                mismatches.append((text, ref, ours))
        elif ours != ref:
            mismatches.append((text, ref, ours))
        else:
            n_ok += 1
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    n_hand = len(_handwritten())
    assert n_hand >= 200 and all("error" not in r for r in oracle_results[:n_hand]), "corpus must stay convertible"
    assert n_ok >= len(corpus) - 120  # most fuzz strings convert; upstream fails on e.g. 噷 and ٣


def test_unsupported_language_and_types():
    with pytest.raises(ValueError, match="not supported"):
        clean_text("hello", "xx")
    with pytest.raises(TypeError):
        clean_text(b"bytes", "zh")  # type: ignore[arg-type]


def test_arbitrary_unicode_only_raises_valueerror():
    """Property: random code points (any plane, controls, surrogates) give consistent output or a
    ValueError, never another exception."""
    rng = random.Random(20240315)
    n_ok = 0
    for _ in range(400):
        pool = [chr(rng.randrange(0x110000)) for _ in range(4)] + list("一不儿好你我3.5-%：，。") + ["\u4e00", "噷"]
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 25)))
        try:
            phones, word2ph, norm = clean_text(text, "zh")
        except ValueError:
            continue
        n_ok += 1
        assert sum(word2ph) == len(phones)
        if "￥" not in text and "^" not in text:
            assert len(word2ph) == len(norm)
        assert all(p in symbols for p in phones)
        assert len(cleaned_text_to_sequence(phones)) == len(phones)
    assert n_ok > 200
