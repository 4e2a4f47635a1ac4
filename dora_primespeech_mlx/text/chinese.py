"""Chinese text → normalised text → phones (opencpop initial/final symbols) and ``word2ph``.

Behaviourally equal to upstream GPT-SoVITS ``text/chinese2.py`` (gpt-sovits-cpufast 0.1.0) on its
pypinyin path: PaddleSpeech-style normalisation, jieba POS segmentation, pypinyin initials and
``FINALS_TONE3`` finals per word, tone sandhi, erhua, then the opencpop-strict table that splits
every syllable into exactly two symbols. ``word2ph`` has one entry per normalised character (2 for
a hanzi, 1 for a punctuation mark).

jieba replaces upstream's jieba_fast (same dictionary, same HMM tables; tests/test_text_zh.py
checks the outputs agree). A private tokenizer is used so that words other code adds to jieba's
global dictionary cannot change our pronunciations.

With a G2PW resolver installed (:func:`set_polyphone_resolver`, normally through
:func:`.g2pw.configure_g2pw`), readings come from dora-primespeech's g2pW model instead: upstream's
``is_g2pw`` branch, one model pass per segment, then the phrase dictionary; sandhi, erhua and the
phone table are shared.
"""

from __future__ import annotations

import logging
import re
import threading

from pypinyin import Style, lazy_pinyin

from . import zh_normalize
from .symbols import PUNCTUATION, load_json
from .tone_sandhi import ToneSandhi

logger = logging.getLogger(__name__)

__all__ = ["g2p", "set_polyphone_resolver", "text_normalize"]

# CJK punctuation (and a few ASCII marks) → the six marks the model knows
_PUNCT_MAP = {
    "：": ",", "；": ",", "，": ",", "。": ".", "！": "!", "？": "?", "\n": ".", "·": ",", "、": ",",
    "...": "…", "$": ".", "/": ",", "—": "-", "~": "…", "～": "…",
}  # fmt: skip
_PUNCT_RE = re.compile("|".join(re.escape(k) for k in _PUNCT_MAP))
_PUNCT_CLASS = "".join(PUNCTUATION)  # "!?…,.-": '-' last, so literal inside [...]
_NOT_KEPT = re.compile(rf"[^\u4e00-\u9fa5{_PUNCT_CLASS}]+")
_REPEATED_PUNCT = re.compile(rf"([{re.escape(_PUNCT_CLASS)}])([{re.escape(_PUNCT_CLASS)}])+")
_AFTER_PUNCT = re.compile(rf"(?<=[{_PUNCT_CLASS}])\s*")
_LATIN = re.compile("[a-zA-Z]+")


def _replace_punctuation(sentence: str) -> str:
    # 嗯/呣 have pinyin without a vowel (n, m) that the opencpop table cannot spell
    sentence = sentence.replace("嗯", "恩").replace("呣", "母")
    sentence = _PUNCT_RE.sub(lambda m: _PUNCT_MAP[m.group()], sentence)
    return _NOT_KEPT.sub("", sentence)


def text_normalize(text: str) -> str:
    """Normalise Chinese text: numbers etc. in hanzi, only hanzi and ``!?…,.-`` kept, no repeats."""
    joined = "".join(_replace_punctuation(s) for s in zh_normalize.normalize(text))
    # a run of marks becomes its first one (upstream: avoids reference leakage in training)
    return _REPEATED_PUNCT.sub(r"\1", joined)


# ---------------------------------------------------------------------------------------------
# segmentation and pinyin

_lock = threading.Lock()
_state: dict[str, object] = {}


def _jieba():
    """(POS tokenizer, tone sandhi) built once; jieba's dictionary load takes ~1 s."""
    with _lock:
        if not _state:
            import jieba
            import jieba.posseg

            jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" lines
            tokenizer = jieba.Tokenizer()
            _state["posseg"] = jieba.posseg.POSTokenizer(tokenizer)
            _state["sandhi"] = ToneSandhi(tokenizer)
        return _state["posseg"], _state["sandhi"]


_ERHUA_WORDS = load_json("zh_words.json")
_MUST_ERHUA = frozenset(_ERHUA_WORDS["must_erhua"])
_NOT_ERHUA = frozenset(_ERHUA_WORDS["not_erhua"])


def _merge_erhua(initials: list[str], finals: list[str], word: str, pos: str) -> tuple[list[str], list[str]]:
    """儿 after a syllable takes that syllable's tone (小孩儿: er2 → er2, 玩儿 an2 → er2)."""
    if finals and word[len(finals) - 1 : len(finals)] == "儿" and finals[-1] == "er1":
        finals[-1] = "er2"  # a final 儿 is never er1
    if word not in _MUST_ERHUA and (word in _NOT_ERHUA or pos in ("a", "j", "nr")):
        return initials, finals
    if len(finals) != len(word):  # e.g. words containing "……"
        return initials, finals
    if len(word) >= 2 and word[-1] == "儿" and finals[-1] in ("er2", "er5") and word[-2:] not in _NOT_ERHUA:
        finals[-1] = "er" + finals[-2][-1]
    return initials, finals


_OPENCPOP: dict[str, list[str]] = load_json("opencpop_strict.json")
_AFTER_INITIAL = {"uei": "ui", "iou": "iu", "uen": "un"}  # pypinyin's full finals → pinyin spelling
_ZERO_INITIAL_WHOLE = {"ing": "ying", "i": "yi", "in": "yin", "u": "wu"}
_ZERO_INITIAL_HEAD = {"v": "yu", "e": "e", "i": "y", "u": "w"}


def _to_phones(initial: str, final: str) -> list[str]:
    """One syllable (pypinyin initial, FINALS_TONE3 final) → [initial symbol, final+tone symbol]."""
    if initial == final:  # punctuation comes through as itself in both styles
        if initial not in PUNCTUATION:
            raise ValueError(f"no pinyin for {initial!r}: it is neither a known hanzi nor punctuation")
        return [initial]
    body, tone = final[:-1], final[-1:]
    if tone not in ("1", "2", "3", "4", "5"):
        raise ValueError(f"unexpected pinyin final {final!r} (initial {initial!r}): no tone digit")
    if initial:
        syllable = initial + _AFTER_INITIAL.get(body, body)
    else:
        syllable = _ZERO_INITIAL_WHOLE.get(body)
        if syllable is None:
            syllable = _ZERO_INITIAL_HEAD.get(body[:1], body[:1]) + body[1:]
    try:
        sym_initial, sym_final = _OPENCPOP[syllable]
    except KeyError:
        raise ValueError(f"pinyin {syllable!r} ({initial!r} + {final!r}) is not in the opencpop table") from None
    return [sym_initial, sym_final + tone]


_polyphones = None  # a .g2pw.G2PW, or None for pypinyin's readings


def set_polyphone_resolver(resolver) -> None:
    """Take Chinese readings from ``resolver`` (a :class:`.g2pw.G2PW`), or from pypinyin with None."""
    global _polyphones
    _polyphones = resolver


def _g2p_segment(seg: str, phones: list[str], word2ph: list[int]) -> None:
    posseg, sandhi = _jieba()
    words = sandhi.pre_merge_for_modify([(p.word, p.flag) for p in posseg.lcut(seg)])
    resolver = _polyphones
    # g2pW reads the whole segment at once (context decides); words then take their slice
    readings = None if resolver is None else resolver.lazy_pinyin(seg)
    end = 0
    for word, pos in words:
        start, end = end, end + len(word)
        if pos == "eng":
            continue
        if readings is None:
            initials = lazy_pinyin(word, neutral_tone_with_five=True, style=Style.INITIALS)
            finals = lazy_pinyin(word, neutral_tone_with_five=True, style=Style.FINALS_TONE3)
        else:
            initials, finals = resolver.initials_finals(word, readings[start:end])
        finals = sandhi.modified_tone(word, pos, finals)
        initials, finals = _merge_erhua(initials, finals, word, pos)
        for c, v in zip(initials, finals):
            syl = _to_phones(c, v)
            phones.extend(syl)
            word2ph.append(len(syl))


def g2p(norm_text: str) -> tuple[list[str], list[int]]:
    """Phones and per-character phone counts for text already passed through :func:`text_normalize`.

    The text is cut after each punctuation mark; each piece is segmented and converted separately.
    """
    phones: list[str] = []
    word2ph: list[int] = []
    for seg in _AFTER_PUNCT.split(norm_text):
        if seg.strip():
            _g2p_segment(_LATIN.sub("", seg), phones, word2ph)
    return phones, word2ph
