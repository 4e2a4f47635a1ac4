"""``clean_text``: one single-language text segment → (phones, word2ph, normalised text).

Equal to upstream GPT-SoVITS ``text.cleaner.clean_text(text, language, "v2")``
(gpt-sovits-cpufast 0.1.0) for Chinese on its pypinyin path, including the special marks:
``￥`` and ``^`` turn *every* comma of the segment into the pause symbols ``SP2``/``SP3``.
"""

from __future__ import annotations

from . import chinese
from .symbols import symbols

__all__ = ["clean_text", "SUPPORTED_LANGUAGES"]

SUPPORTED_LANGUAGES = ("zh", "en")
_SYMBOL_SET = frozenset(symbols)
# (mark, pause symbol): checked in this order, only the first present one applies
_SPECIAL_MARKS = (("￥", "SP2"), ("^", "SP3"))


def clean_text(text: str, language: str = "zh") -> tuple[list[str], list[int] | None, str]:
    """Convert one segment of ``language`` text to phone symbols.

    Args:
        text: the segment (any Unicode; unsupported characters are dropped by normalisation).
        language: ``"zh"`` (Mandarin) or ``"en"``. Other languages are not implemented yet.

    Returns:
        ``(phones, word2ph, norm_text)``: phone symbols from the v2 table (ids via
        :func:`cleaned_text_to_sequence`), the number of phones of each character of
        ``norm_text`` (``sum(word2ph) == len(phones)``), and the normalised text.

    Raises:
        ValueError: for an unsupported language, or text that upstream cannot convert either
            (e.g. a character pypinyin has no reading for, or a non-ASCII digit in a number).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if language == "en":
        from .english import clean_text_en  # imported late: the English G2P loads its dictionaries

        return clean_text_en(text)
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"language {language!r} is not supported by this frontend; use one of {SUPPORTED_LANGUAGES}")
    try:
        for mark, pause in _SPECIAL_MARKS:
            if mark in text:
                return _clean_with_pause_mark(text, mark, pause)
        norm_text = chinese.text_normalize(text)
        phones, word2ph = chinese.g2p(norm_text)
    except (IndexError, KeyError) as e:  # where upstream fails with the same kind of error
        raise ValueError(f"cannot convert {text!r} to phones: {type(e).__name__}: {e}") from e
    if sum(word2ph) != len(phones) or len(word2ph) != len(norm_text):
        # upstream asserts both; they fail when pypinyin reads a run of characters as one item
        raise ValueError(
            f"cannot align phones with characters for {text!r} (normalised {norm_text!r}): "
            f"{len(norm_text)} characters, {len(word2ph)} word2ph entries, {len(phones)} phones"
        )
    phones = [p if p in _SYMBOL_SET else "UNK" for p in phones]
    return phones, word2ph, norm_text


def _clean_with_pause_mark(text: str, mark: str, pause: str) -> tuple[list[str], list[int], str]:
    # upstream's clean_special: the mark becomes a comma, then every comma phone becomes the pause
    norm_text = chinese.text_normalize(text.replace(mark, ","))
    phones, word2ph = chinese.g2p(norm_text)
    return [pause if p == "," else p for p in phones], word2ph, norm_text
