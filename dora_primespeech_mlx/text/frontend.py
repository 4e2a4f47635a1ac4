"""Text of one request -> sentences of phone ids, ready for BERT features and the T2S model.

``text_to_phone_segments(text, language)`` runs dora-primespeech's engine preprocessing
(``TextPreprocessor.preprocess`` with ``cut5``; interface doc 4.5): split into pieces
(:func:`.segment.split_sentences`), cut each piece into Chinese / English spans
(:func:`.segment.split_languages`), convert each span with ``clean_text`` and re-run a piece that
yields fewer than 6 phones with a ``.`` in front. Chinese spans carry ``word2ph`` and need BERT
features (``needs_bert``); English spans get zero features of their phone count.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..options import NothingToSpeak
from .english import clean_text_en
from .segment import check_language_mode, cut_long_piece, split_languages, split_sentences
from .symbols import cleaned_text_to_sequence

__all__ = ["MAX_PIECE_CHARS", "Segment", "Sentence", "piece_to_sentence", "is_spoken_phone", "request_sentences",
           "text_to_phone_segments", "warm_up_frontend", "WARM_UP_TEXT_MIXED"]

logger = logging.getLogger(__name__)

# longest piece synthesised as one sentence (mofa's TTS_MAX_SEGMENT_LENGTH): longer ones are cut at a
# space or comma; keeps normalisation linear in the text and every piece inside BERT's 512 positions
MAX_PIECE_CHARS = 100
_MIN_PHONES = 6  # fewer phones than this make the model unstable: upstream retries with "." + text


@dataclass(frozen=True)
class Segment:
    """One single-language span of a sentence, as upstream ``clean_text`` returns it."""

    lang: str  # "zh" | "en"
    text: str  # the span as cut from the sentence
    norm_text: str
    phones: tuple[str, ...]
    phone_ids: tuple[int, ...]
    word2ph: tuple[int, ...] | None  # phones per character of norm_text (Chinese only)

    @property
    def needs_bert(self) -> bool:
        """Chinese spans get RoBERTa features; the others get zeros (1024, len(phones))."""
        return self.lang == "zh"


@dataclass(frozen=True)
class Sentence:
    """One piece of the request, synthesised as one T2S sequence."""

    text: str  # the piece after splitting (with the "." of the short-piece retry, if any)
    segments: tuple[Segment, ...]

    @property
    def phones(self) -> list[str]:
        return [p for s in self.segments for p in s.phones]

    @property
    def phone_ids(self) -> list[int]:
        return [i for s in self.segments for i in s.phone_ids]

    @property
    def norm_text(self) -> str:
        return "".join(s.norm_text for s in self.segments)


def _clean_zh(text: str) -> tuple[list[str], list[int] | None, str]:
    from .cleaner import clean_text  # imported late: the Chinese frontend is its own module

    return clean_text(text, "zh")


def _clean_span(lang: str, text: str) -> Segment:
    if lang == "en":
        phones, word2ph, norm = clean_text_en(text)
    else:
        phones, word2ph, norm = _clean_zh(text)
    return Segment(
        lang=lang,
        text=text,
        norm_text=norm,
        phones=tuple(phones),
        phone_ids=tuple(cleaned_text_to_sequence(phones)),
        word2ph=None if word2ph is None else tuple(int(x) for x in word2ph),
    )


def piece_to_sentence(piece: str, language: str) -> Sentence:
    """Phones of one piece (upstream ``get_phones_and_bert`` without the BERT part).

    Double spaces are squeezed first; a piece of fewer than 6 phones is converted again as
    ``"." + piece``, once.
    """
    check_language_mode(language)
    text = piece
    for final in (False, True):
        squeezed = re.sub(r" {2,}", " ", text)
        segs = tuple(_clean_span(sp.lang, sp.text) for sp in split_languages(squeezed, language))
        sentence = Sentence(text=text, segments=segs)
        if final or len(sentence.phones) >= _MIN_PHONES:
            return sentence
        text = "." + piece
    raise AssertionError("unreachable")


def text_to_phone_segments(text: str, language: str = "auto", include_space: bool = True) -> list[Sentence]:
    """Split one request and convert every piece to phones.

    Args:
        text: the text to speak (any mix of Chinese and English).
        language: dora-primespeech ``TEXT_LANG``: ``auto``, ``zh``, ``all_zh`` (Latin spans are
            English, Han spans Chinese) or ``en`` (everything through the English frontend).
        include_space: see :func:`.segment.split_sentences`.

    Returns:
        The sentences in order; pieces whose normalised text is empty are left out, as upstream.

    Raises:
        ValueError: unsupported language (Japanese, Korean, Cantonese), kana/Hangul in the text,
            text with nothing to speak, or text the frontends cannot convert.
    """
    check_language_mode(language)
    out = []
    for piece in split_sentences(text, language, include_space):
        sentence = piece_to_sentence(piece, language)
        if sentence.norm_text:
            out.append(sentence)
    return out


# Chinese with English, a number, a compound and a made-up word: loads every table the frontends read
# lazily (jieba, pypinyin, CMUdict, homographs, inflect, wordsegment, the out-of-vocabulary GRU)
WARM_UP_TEXT_MIXED = "你好，GPT-SoVITS reads 3 words like primespeech and zorblax today。"


def warm_up_frontend() -> None:
    """Load the frontends' lazy tables now rather than in the first request that needs them (the
    English ones cost ~0.6 s on a 2-core CPU and ~160 MB, paid by the first text with an English word
    unless the voice's transcript had one)."""
    text_to_phone_segments(WARM_UP_TEXT_MIXED, "auto")


def request_sentences(text: str, language: str, *, split: bool = True,
                      notes: list[str] | None = None) -> Iterator[Sentence]:
    """The sentences of one text that have phones, lazily: the one place that decides what is spoken.

    With `notes` (a request's text), pieces longer than `MAX_PIECE_CHARS` are cut and a piece the
    frontend cannot speak (kana, hangul, a number too large to read) is skipped with a note, so the
    rest is still spoken, and a text of only punctuation raises `NothingToSpeak`; without `notes`
    (a voice's transcript) any failure raises. Pure Python: the engine adds BERT features.
    """
    check_language_mode(language)
    try:
        pieces = split_sentences(text, language) if split else [text]
    except ValueError as exc:  # only punctuation or blanks
        if notes is None:
            raise
        raise NothingToSpeak(str(exc)) from None
    if notes is not None:
        cut = [c for piece in pieces for c in cut_long_piece(piece, MAX_PIECE_CHARS)]
        if len(cut) > len(pieces):
            notes.append(f"{len(cut) - len(pieces)} piece(s) longer than {MAX_PIECE_CHARS} characters were cut")
        pieces = cut
    for piece in pieces:
        try:
            sentence = piece_to_sentence(piece, language)
        except Exception as exc:  # noqa: BLE001 - one bad sentence must not silence the others
            if notes is None:
                raise
            notes.append(f"skipped {piece[:40]!r}: {type(exc).__name__}: {str(exc)[:200]}")
            logger.warning("skipped sentence %r: %s", piece[:40], exc)
            continue
        if not sentence.norm_text and split:
            continue  # upstream drops pieces that normalise to nothing
        if any(is_spoken_phone(p) for p in sentence.phones):
            yield sentence  # pauses and punctuation alone (emoji, symbols, other scripts) are not speech


_SILENT_PHONES = frozenset({"SP", "SP2", "SP3", "UNK"})


def is_spoken_phone(phone: str) -> bool:
    """A phone that is speech: not a pause, not unknown, not punctuation."""
    return phone not in _SILENT_PHONES and any(c.isalnum() for c in phone)
