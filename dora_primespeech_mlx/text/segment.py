"""Sentence splitting and language segmentation, as dora-primespeech feeds its engine.

Splitting (interface doc 4.5; upstream ``TTS_infer_pack/TextPreprocessor.py`` ``preprocess`` /
``pre_seg_text`` and ``text_segmentation_method.py`` ``cut5`` / ``split_big_text``):

1. collapse runs of ``! ? … , . -`` and space to their first character (dora's 2024 copy has the
   space in that set; upstream's current copy does not: ``include_space``);
2. prefix ``。`` (``.`` for ``en``) when the text before the first stop is shorter than 4 characters;
3. ``cut5``: cut after each of ``, . ; ? ! 、 ， 。 ？ ！ ： …`` except a ``.`` between two digits, and
   at newlines; drop pieces made only of those marks;
4. join consecutive pieces until each is at least 5 characters; a short rest joins the last piece;
5. drop blank / symbol-only pieces, end each with ``。`` (``.`` for ``en``) unless it ends with a stop,
   and re-cut pieces over 510 characters at stops.

Language segmentation replaces LangSegment, which dora used and which cannot run offline
(interface doc 4.4, oracle.md 7). Rules: Latin letters -> ``en``, Han characters -> ``zh``; full-width
CJK punctuation joins a neighbouring ``zh`` span (previous first), so a Chinese comma after an
English word still becomes a pause; any other character (digits, ASCII punctuation, spaces) joins
the span before it, or the first span when it leads. Kana and Hangul raise ``ValueError`` (Japanese
and Korean are not supported yet), as do the ``ja``/``ko``/``yue`` language modes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "LANGUAGE_MODES",
    "LangSpan",
    "split_languages",
    "split_sentences",
    "collapse_punctuation",
    "cut5",
    "merge_short_texts",
    "split_big_text",
    "check_language_mode",
]

LANGUAGE_MODES = ("auto", "zh", "en", "all_zh")
_NOT_YET = ("ja", "ko", "yue", "all_ja", "all_ko", "all_yue", "auto_yue")

# upstream text_segmentation_method.splits: a piece ending in one of these needs no added stop
SPLITS = frozenset("，。？！,.?!~:：—…")
_CUT5_MARKS = frozenset(",.;?!、，。？！;：…")
_COLLAPSE = "!?…,.-"


def check_language_mode(language: str) -> str:
    """Validate a dora-primespeech ``TEXT_LANG`` value; returns it.

    Raises:
        ValueError: for Japanese / Korean / Cantonese modes (not supported yet) and unknown values.
    """
    if language in LANGUAGE_MODES:
        return language
    if language in _NOT_YET:
        raise ValueError(
            f"text language {language!r} is not supported yet (Japanese, Korean and Cantonese have no "
            f"frontend in dora-primespeech-mlx); use one of {LANGUAGE_MODES}"
        )
    raise ValueError(f"unknown text language {language!r}; use one of {LANGUAGE_MODES}")


# ---------------------------------------------------------------------------------------------
# sentence splitting


def collapse_punctuation(text: str, include_space: bool = True) -> str:
    """Keep only the first of each run of ``! ? … , . -`` (and space, as dora's copy does)."""
    marks = _COLLAPSE + (" " if include_space else "")
    cls = "[" + re.escape(marks) + "]"
    return re.sub(f"({cls}){cls}+", r"\1", text)


def _first_clause(text: str) -> str:
    return re.split("[" + re.escape("".join(sorted(SPLITS))) + "]", text)[0].strip()


def cut5(text: str) -> str:
    """Upstream ``cut5``: a newline after every stop mark; symbol-only pieces dropped."""
    text = text.strip("\n")
    pieces, cur = [], []
    for i, ch in enumerate(text):
        cur.append(ch)
        if ch in _CUT5_MARKS:
            if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
                continue  # decimal point
            pieces.append("".join(cur))
            cur = []
    if cur:
        pieces.append("".join(cur))
    return "\n".join(p for p in pieces if not set(p) <= _CUT5_MARKS)


def merge_short_texts(texts: list[str], threshold: int = 5) -> list[str]:
    """Join consecutive pieces until each has ``threshold`` characters; a short rest joins the last."""
    if len(texts) < 2:
        return texts
    out, cur = [], ""
    for t in texts:
        cur += t
        if len(cur) >= threshold:
            out.append(cur)
            cur = ""
    if cur:
        if out:
            out[-1] += cur
        else:
            out.append(cur)
    return out


def split_big_text(text: str, max_len: int = 510) -> list[str]:
    """Cut a long piece at stop marks into chunks of at most ``max_len`` characters (when possible)."""
    parts = re.split("([" + re.escape("".join(sorted(SPLITS))) + "])", text)
    out, cur = [], ""
    for part in parts:
        if len(cur + part) > max_len:
            out.append(cur)
            cur = part
        else:
            cur += part
    if cur:
        out.append(cur)
    return out


def cut_long_piece(piece: str, limit: int) -> list[str]:
    """`piece` in chunks of at most `limit` characters, cut after the last space or punctuation mark
    inside the limit (a hard cut when there is none). Bounds what each piece costs downstream: the
    normalisers' regexes are quadratic in a run of digits, and BERT takes 512 positions."""
    out = []
    while len(piece) > limit:
        window = piece[:limit]
        cut = max(window.rfind(c) for c in " ，,、；;：:") + 1
        if cut <= limit // 4:  # no useful boundary: cut hard
            cut = limit
        out.append(piece[:cut])
        piece = piece[cut:]
    if piece:
        out.append(piece)
    return out


def split_sentences(text: str, language: str, include_space: bool = True) -> list[str]:
    """Split one text input into the pieces the engine synthesises one by one (steps 1-5 above).

    Args:
        text: the text of one request.
        language: the request's language mode (only ``en`` vs. the others matters here).
        include_space: collapse spaces with punctuation (dora's 2024 engine) or not (upstream now).

    Returns:
        The pieces, each ending with a stop mark. ``[]`` for empty text.

    Raises:
        ValueError: when the text has no speakable piece (upstream: "请输入有效文本").
    """
    stop = "." if language == "en" else "。"
    text = collapse_punctuation(text, include_space).strip("\n")
    if not text:
        return []
    if text[0] not in SPLITS and len(_first_clause(text)) < 4:
        text = stop + text  # a very short first clause makes the model leak the prompt
    cut = cut5(text)
    while "\n\n" in cut:
        cut = cut.replace("\n\n", "\n")
    pieces = cut.split("\n")
    if all(p in ("", " ", "\n") for p in pieces):
        raise ValueError(f"no speakable text in {text!r} (only punctuation or blanks); upstream: 请输入有效文本")
    pieces = merge_short_texts([p for p in pieces if p not in ("", " ")], 5)
    out = []
    for p in pieces:
        if not p.strip() or not re.sub(r"\W+", "", p):
            continue
        if p[-1] not in SPLITS:
            p += stop
        out.extend(split_big_text(p) if len(p) > 510 else [p])
    return out


# ---------------------------------------------------------------------------------------------
# language segmentation


@dataclass(frozen=True)
class LangSpan:
    """A run of text in one language: ``lang`` is ``"zh"`` or ``"en"``."""

    lang: str
    text: str


def _char_class(ch: str) -> str:
    o = ord(ch)
    if ch.isascii():
        return "en" if ch.isalpha() else "n"
    if 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x323AF:
        return "zh"
    if 0x3040 <= o <= 0x30FF and o != 0x30FB or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
        return "ja"  # kana (the katakana middle dot U+30FB is also Chinese name punctuation)
    if 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F or 0xA960 <= o <= 0xA97F or 0xAC00 <= o <= 0xD7FF:
        return "ko"
    if (0xC0 <= o <= 0x24F and o not in (0xD7, 0xF7)) or 0x1E00 <= o <= 0x1EFF:
        return "en"  # accented Latin: the English normaliser strips the accents
    if 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF or o in (0x2014, 0x2026, 0x2018, 0x2019, 0x201C, 0x201D, 0x30FB):
        return "wzh"  # full-width / CJK punctuation, leans to a Chinese neighbour
    return "n"


def split_languages(text: str, language: str) -> list[LangSpan]:
    """Cut one piece into single-language spans for ``clean_text``.

    Args:
        text: one piece from :func:`split_sentences`.
        language: ``en`` (everything is English, as upstream) or ``auto``/``zh``/``all_zh``
            (Latin -> en, Han -> zh; upstream's LangSegment output for these scripts).

    Raises:
        ValueError: for Japanese kana or Korean Hangul in the text, or an unsupported mode.
    """
    check_language_mode(language)
    classes = [_char_class(c) for c in text]
    for name, code in (("Japanese kana", "ja"), ("Korean Hangul", "ko")):
        if code in classes:
            bad = next(c for c, k in zip(text, classes) if k == code)
            raise ValueError(
                f"{name} ({bad!r}) in {text!r}: Japanese and Korean are not supported yet; "
                "send Chinese and/or English text"
            )
    if language == "en":
        return [LangSpan("en", text)] if text else []
    strong = [(i, k) for i, k in enumerate(classes) if k in ("zh", "en")]
    if not strong:
        return [LangSpan("zh", text)] if text else []
    resolved: list[str | None] = [k if k in ("zh", "en") else None for k in classes]
    # full-width punctuation: previous strong neighbour if Chinese, else the next one if Chinese
    prev_strong, nxt = None, 0
    for i, k in enumerate(classes):
        while nxt < len(strong) and strong[nxt][0] <= i:
            prev_strong = strong[nxt][1]
            nxt += 1
        if k == "wzh":
            next_strong = strong[nxt][1] if nxt < len(strong) else None
            if prev_strong == "zh" or (prev_strong is None and next_strong is None):
                resolved[i] = "zh"
            elif next_strong == "zh":
                resolved[i] = "zh"
            else:
                resolved[i] = prev_strong or next_strong
    # everything else follows the character before it; leading ones follow the first resolved one
    first = next(r for r in resolved if r is not None)
    last = first
    for i, r in enumerate(resolved):
        if r is None:
            resolved[i] = last
        else:
            last = r
    spans: list[LangSpan] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or resolved[i] != resolved[start]:
            spans.append(LangSpan(resolved[start], text[start:i]))
            start = i
    return spans
