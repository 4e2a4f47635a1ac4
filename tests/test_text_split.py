"""Sentence splitting (interface doc 4.5) and language segmentation.

Splitting is checked against upstream's own functions (``cut5``, ``merge_short_text_in_array``,
``pre_seg_text``, ``replace_consecutive_punctuation`` of gpt-sovits-cpufast 0.1.0, run by
tools/oracle/refs_text_en.py) on hand-written and random texts; dora's 2024 copy differs only in
collapsing spaces with punctuation (``include_space=True``), which has golden tests here.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from dora_primespeech_mlx.text.frontend import piece_to_sentence, text_to_phone_segments
from dora_primespeech_mlx.text.segment import (
    LangSpan,
    check_language_mode,
    collapse_punctuation,
    cut5,
    merge_short_texts,
    split_big_text,
    split_languages,
    split_sentences,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from en_oracle import oracle_text_en  # noqa: E402

HANDWRITTEN = [
    "你好，世界。今天天气很好！我们去公园吧？",
    "Hi. This is a test, with commas; and more!",
    "价格是3.5元，不是35元。",
    "Version 3.11 is out. Pi is 3.14!",
    "啊。",
    "好",
    "OK",
    "。。。！！！",
    "...!!!",
    "   ",
    "\n\n你好\n\n世界\n",
    "第一行\n第二行很长很长\n第三",
    "Wait... what?! No way!!!",
    "你好——再见……好的",
    "一、二、三、四、五。",
    "嗯，好，行，可以，没问题。",
    "Hello,world.How are you?",
    "Hello, world. How are you?",
    "我们：出发吧；快点。",
    "a,b,c,d,e,f,g.",
    "“你好”，他说。",
    "End without stop",
    "短。很长的第二句话在这里呢。",
    "～好的～",
    "x" * 600,
    ("这是一个很长的句子，" * 60) + "结束。",
    ("This is a long sentence, " * 30) + "the end.",
]
_ALPHABET = list("你好世界我们是的了在有很abcXYZ 0123456789") + list(",.;?!、，。？！：…-—~:\n ") * 2


def _fuzz(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


SPLIT_CORPUS = HANDWRITTEN + _fuzz(11, 250)


@pytest.fixture(scope="module")
def oracle(request) -> list[dict]:
    return oracle_text_en(request, {"split": SPLIT_CORPUS})["split"]


def test_collapse_and_cut5_match_oracle(oracle):
    for text, ref in zip(SPLIT_CORPUS, oracle):
        assert collapse_punctuation(text, include_space=False) == ref["collapse"], text
        assert cut5(text) == ref["cut5"], text


def test_split_sentences_match_oracle(oracle):
    n_ok = n_err = 0
    for text, ref in zip(SPLIT_CORPUS, oracle):
        for lang in ("zh", "en"):
            expected = ref["pre_seg"][lang]
            if isinstance(expected, dict):  # upstream raised
                assert expected["error"].startswith("ValueError"), expected
                with pytest.raises(ValueError):
                    split_sentences(text, lang, include_space=False)
                n_err += 1
            else:
                assert split_sentences(text, lang, include_space=False) == expected, (text, lang)
                n_ok += 1
    assert n_ok > 400 and n_err > 0  # both paths were exercised


def test_merge_short_texts():
    assert merge_short_texts(["ab", "cd", "efgh", "i"]) == ["abcdefghi"]
    assert merge_short_texts(["ab", "cd", "e", "fghij", "k"]) == ["abcde", "fghijk"]
    assert merge_short_texts(["ab"]) == ["ab"]
    assert merge_short_texts(["ab", "c"]) == ["abc"]


def test_dora_collapses_spaces_too():
    assert collapse_punctuation("Hello, world.  How are you?!") == "Hello,world.How are you?"
    assert collapse_punctuation("Hello, world.  How are you?!", include_space=False) == "Hello, world.  How are you?"
    assert split_sentences("Hello, world. How are you?", "en") == ["Hello,", "world.", "How are you?"]
    assert split_sentences("Hello, world. How are you?", "en", include_space=False) == ["Hello,", " world.", " How are you?"]


def test_short_first_clause_gets_stop_prefix():
    # first clause "好的" (2 chars) -> "。" prefix, then cut5 drops the lone mark
    assert split_sentences("好的，我们开始吧。", "zh") == ["好的，我们开始吧。"]
    assert split_sentences("Hi", "en") == ["Hi."]
    assert split_sentences("Hi", "zh") == ["Hi。"]


def test_long_pieces_are_cut_at_510():
    text = ("这是一个很长的句子，" * 60) + "结束。"
    # cut5 cuts at every comma; merging keeps them separate (each >= 5 chars), so no piece is long
    assert all(len(p) <= 510 for p in split_sentences(text, "zh"))
    long_piece = "长" * 300 + "，" + "长" * 300 + "。"
    parts = split_big_text(long_piece)
    assert "".join(parts) == long_piece and all(len(p) <= 510 for p in parts)
    # no stop mark to cut at: upstream emits an empty chunk, the run, then the stop on its own
    assert split_sentences("x" * 600, "en") == ["", "x" * 600, "."]


def test_blank_and_symbol_only_input():
    assert split_sentences("", "zh") == []
    with pytest.raises(ValueError, match="no speakable text"):
        split_sentences("。。。！！！", "zh")
    with pytest.raises(ValueError):
        text_to_phone_segments("。！？", "auto")


def test_short_piece_retries_with_dot():
    s = piece_to_sentence("Hi.", "en")
    assert s.text == ".Hi." and s.phones == [".", "HH", "AY1", "."]
    s = piece_to_sentence("This is long enough.", "en")
    assert s.text == "This is long enough."
    s = piece_to_sentence("好。", "zh")
    assert s.text.startswith(".") and s.phones[0] == "."


# ---------------------------------------------------------------------------------------------
# language segmentation


@pytest.mark.parametrize(
    ("text", "spans"),
    [
        ("这家resturant的steak很有名", [("zh", "这家"), ("en", "resturant"), ("zh", "的"), ("en", "steak"), ("zh", "很有名")]),
        ("Hello，世界!", [("en", "Hello"), ("zh", "，世界!")]),
        ("Hello, 世界", [("en", "Hello, "), ("zh", "世界")]),
        ("我有3个apple和2个banana.", [("zh", "我有3个"), ("en", "apple"), ("zh", "和2个"), ("en", "banana.")]),
        ("2024年OK", [("zh", "2024年"), ("en", "OK")]),
        ("iPhone 15很好", [("en", "iPhone 15"), ("zh", "很好")]),
        ("“Python”是什么？", [("en", "“Python"), ("zh", "”是什么？")]),
        ("12345", [("zh", "12345")]),
        ("café很好", [("en", "café"), ("zh", "很好")]),
    ],
)
def test_split_languages_auto(text, spans):
    assert [(s.lang, s.text) for s in split_languages(text, "auto")] == spans


def test_split_languages_properties():
    rng = random.Random(3)
    alphabet = list("你好世界abcXYZ 019,.，。！？、—…“”")
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        for mode in ("auto", "zh", "all_zh"):
            spans = split_languages(text, mode)
            assert "".join(s.text for s in spans) == text
            assert all(s.text for s in spans)
            assert all(a.lang != b.lang for a, b in zip(spans, spans[1:]))  # runs are maximal
            for s in spans:
                assert not any("a" <= c.lower() <= "z" for c in s.text) or s.lang == "en"
                assert not any("\u4e00" <= c <= "\u9fff" for c in s.text) or s.lang == "zh"
        assert split_languages(text, "en") == [LangSpan("en", text)]


@pytest.mark.parametrize("mode", ["ja", "ko", "yue", "all_ja", "all_ko", "all_yue", "auto_yue"])
def test_unsupported_modes_raise(mode):
    with pytest.raises(ValueError, match="not supported yet"):
        check_language_mode(mode)
    with pytest.raises(ValueError, match="not supported yet"):
        text_to_phone_segments("你好", mode)


@pytest.mark.parametrize("text", ["こんにちは世界", "你好カタカナ", "안녕하세요", "Hello 한국"])
def test_japanese_korean_text_raises(text):
    for mode in ("auto", "zh", "all_zh", "en"):
        with pytest.raises(ValueError, match="not supported yet"):
            split_languages(text, mode)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown text language"):
        check_language_mode("fr")


def test_frontend_mixed_sentence_structure():
    sents = text_to_phone_segments("这家resturant的steak很有名，但是vegetable salad的price有点贵。", "auto")
    assert [s.text for s in sents] == ["这家resturant的steak很有名，", "但是vegetable salad的price有点贵。"]
    first = sents[0]
    assert [g.lang for g in first.segments] == ["zh", "en", "zh", "en", "zh"]
    for g in first.segments:
        assert g.needs_bert == (g.lang == "zh")
        assert (g.word2ph is not None) == (g.lang == "zh")
        if g.word2ph is not None:
            assert sum(g.word2ph) == len(g.phones) and len(g.word2ph) == len(g.norm_text)
        assert len(g.phone_ids) == len(g.phones)
    # oracle.md 7: upstream phones of these segments
    assert " ".join(first.segments[1].phones) == "R EH1 S T ER0 AH0 N T"
    assert " ".join(first.segments[3].phones) == "S T EY1 K"
    assert first.phone_ids == [i for g in first.segments for i in g.phone_ids]


def test_en_mode_is_one_english_segment():
    sents = text_to_phone_segments("I love 北京 and Paris.", "en")
    assert len(sents) == 1 and [g.lang for g in sents[0].segments] == ["en"]
    assert sents[0].norm_text == "I love  and Paris."  # the English normaliser drops Han characters
