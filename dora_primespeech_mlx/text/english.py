"""English text frontend: normalisation and grapheme-to-phoneme, equal to upstream GPT-SoVITS v2.

Reference: ``text/english.py`` and ``text/en_normalization/expend.py`` of gpt-sovits-cpufast 0.1.0
(upstream GPT-SoVITS ~2025-12). Steps:

1. :func:`text_normalize`: full-width ``。！？`` to ASCII, numbers / ordinals / years / times /
   units / currency / decimals / fractions / arithmetic spelled out (``inflect``), accents stripped,
   everything but ``A-Za-z'.,?!-`` and spaces removed, ``i.e.``/``e.g.`` expanded, every capital
   letter that follows a non-space split off (``"OpenAI"`` -> ``"Open A I"``), repeated punctuation
   collapsed.
2. :func:`g2p`: tokens ``[A-Za-z]+('[A-Za-z]+)?`` and ``.,?!-``; homographs by POS tag
   (:mod:`.pos_tagger`), then the CMU dictionary (upstream's extended copy), a name dictionary for
   Title-case words, letter-by-letter for unknown words of <= 3 letters, ``'s`` possessives,
   compound splitting (``wordsegment``) and finally the g2p_en GRU encoder-decoder, in numpy.

Data, all from installed packages, nothing downloaded: ``data/en_cmudict.tsv.gz`` and
``data/en_names.tsv.gz`` (upstream's dictionaries, dumped by ``tools/oracle/refs_text_en.py
--dump-tables``; CMUdict is BSD-licensed, GPT-SoVITS MIT), g2p_en's ``checkpoint20.npz`` and
``homographs.en`` (read by path: importing ``g2p_en`` would call ``nltk.download``), ``wordsegment``'s
word counts and ``inflect``.

Upstream quirks kept on purpose (they change phones, and parity is the contract): the punctuation
map escapes its own keys, so ``;:，；`` are *removed* rather than turned into commas; a negative
number swallows the space before it (``"is -3"`` -> ``"isnegative three"``); ``UW`` (unstressed,
only produced by the neural model) is dropped.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import re
import sys
import types
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from .symbols import symbols

__all__ = ["text_normalize", "g2p", "clean_text_en", "predict_oov", "pos_tags"]

log = logging.getLogger(__name__)

_SYMBOL_SET = frozenset(symbols)
_PUNCT = ("!", "?", "…", ",", ".", "-")  # upstream text.symbols.punctuation

# ---------------------------------------------------------------------------------------------
# data


def _read_tsv_gz(name: str) -> dict[str, list[str]]:
    path = resources.files(__package__).joinpath("data", name)
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"English dictionary {name!r} is missing from the installed package ({path}); reinstall "
            "dora-primespeech-mlx (package data must include text/data/*.tsv.gz)"
        ) from e
    table = {}
    for line in raw.splitlines():
        word, _, phones = line.partition("\t")
        table[word] = phones.split(" ")  # a leading "" phone is upstream data; dropped at the end
    return table


@lru_cache(maxsize=1)
def _cmu() -> dict[str, list[str]]:
    return _read_tsv_gz("en_cmudict.tsv.gz")


@lru_cache(maxsize=1)
def _names() -> dict[str, list[str]]:
    return _read_tsv_gz("en_names.tsv.gz")


def _g2p_en_file(name: str) -> Path:
    spec = importlib.util.find_spec("g2p_en")  # top-level lookup only: its __init__ is never run
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the English G2P needs the data files of the 'g2p_en' package; `pip install g2p_en` "
            "(reinstall dora-primespeech-mlx to get all its dependencies)"
        )
    return Path(spec.submodule_search_locations[0]) / name


@lru_cache(maxsize=1)
def _homographs() -> dict[str, tuple[list[str], list[str], str]]:
    table = {}
    for raw in _g2p_en_file("homographs.en").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, pron1, pron2, pos1 = line.split("|")
        table[head.lower()] = (pron1.split(), pron2.split(), pos1)
    # upstream's own corrections of two entries
    table["read"] = (["R", "IY1", "D"], ["R", "EH1", "D"], "VBP")
    table["complex"] = (["K", "AH0", "M", "P", "L", "EH1", "K", "S"], ["K", "AA1", "M", "P", "L", "EH0", "K", "S"], "JJ")
    return table


def _no_typecheck(func=None, **_kw):
    return func if func is not None else (lambda f: f)


@lru_cache(maxsize=1)
def _inflect():
    # inflect wraps every function in typeguard's @typechecked, which costs ~3-5 s at import.
    # Upstream imports it under a no-op stand-in; so do we (only while nothing else has typeguard).
    if "inflect" in sys.modules or "typeguard" in sys.modules:
        import inflect
    else:
        stub = types.ModuleType("typeguard")
        stub.typechecked = _no_typecheck
        sys.modules["typeguard"] = stub
        try:
            import inflect
        finally:
            sys.modules.pop("typeguard", None)
    return inflect.engine()


@lru_cache(maxsize=1)
def _wordsegment():
    import wordsegment

    wordsegment.load()  # reads the word counts shipped inside the package
    return wordsegment


# ---------------------------------------------------------------------------------------------
# normalisation (upstream en_normalization/expend.py)

_UNITS = {  # suffix -> (singular, plural)
    "m": ("meter", "meters"),
    "km": ("kilometer", "kilometers"),
    "km/h": ("kilometer per hour", "kilometers per hour"),
    "ft": ("feet", "feet"),
    "L": ("liter", "liters"),
    "tbsp": ("tablespoon", "tablespoons"),
    "tsp": ("teaspoon", "teaspoons"),
    "h": ("hour", "hours"),
    "min": ("minute", "minutes"),
    "s": ("second", "seconds"),
    "°C": ("degree celsius", "degrees celsius"),
    "°F": ("degree fahrenheit", "degrees fahrenheit"),
}

_RE_LIST_ORDINAL = re.compile(r"\b([0-9]+)\. ")  # "1. " at a list item
_SUP = "[⁰¹²³⁴⁵⁶⁷⁸⁹ˣʸⁿ]*"
# one operand: signed number, bare decimal, or one letter, each with optional superscripts
_OPERAND = rf"((-?)((\d+)(\.\d+)?{_SUP})|(\.\d+{_SUP})|([A-Za-z]{_SUP}))"
_RE_ARITH = re.compile(_OPERAND + r"\s+([+\-×÷=])\s+" + _OPERAND)  # groups: 1 = left, 8 = op, 9 = right
_ARITH_WORDS = {"+": " plus ", "-": " minus ", "×": " times ", "÷": " divided by ", "=": " Equals "}
_RE_NEGATIVE = re.compile(r"(?:^|\s+)(-)(\d+)")
_RE_COMMA_NUMBER = re.compile(r"([0-9][0-9\,]+[0-9])")
_RE_TIME = re.compile(r"\b([01]?[0-9]|2[0-3]):([0-5][0-9])\b")
_RE_UNIT = re.compile(r"\b([0-9]+(\.[0-9]+)?(m|km|km/h|ft|L|tbsp|tsp|h|min|s|°C|°F))\b")
_RE_POUNDS = (re.compile(r"£([0-9\.\,]*[0-9]+)"), re.compile(r"([0-9\.\,]*[0-9]+)£"))
# upstream's trailing-dollar class also admits "(" (a typo kept for parity)
_RE_DOLLARS = (re.compile(r"\$([0-9\.\,]*[0-9]+)"), re.compile(r"([(0-9\.\,]*[0-9]+)\$"))
_RE_DECIMAL = re.compile(r"([0-9]+\.\s*[0-9]+)")
_RE_FRACTION = re.compile(r"([0-9]+/[0-9]+)")
_RE_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")
_RE_NUMBER = re.compile(r"[0-9]+")


def _list_ordinal(m: re.Match) -> str:
    return _inflect().ordinal(m.group(1)) + ", "


def _arith(m: re.Match) -> str:
    return m.group(1) + _ARITH_WORDS[m.group(8)] + m.group(9)


def _negative(m: re.Match) -> str:
    return ("negative " if m.group(1) else "") + m.group(2)  # the leading space is consumed (upstream)


def _time(m: re.Match) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    period = "a.m." if hours < 12 else "p.m."
    if hours > 12:
        hours -= 12
    eng = _inflect()
    if minutes == 0:
        return f"{eng.number_to_words(hours)} o'clock {period}"
    return f"{eng.number_to_words(hours)} {eng.number_to_words(minutes)} {period}"


def _unit(m: re.Match) -> str:
    suffix = m.group(3)
    value = int(m.group(1).replace(suffix, "").replace(".", ""))
    singular = m.group(2) is None and value == 1
    return m.group(1).replace(suffix, " " + _UNITS[suffix][0 if singular else 1])


def _money(m: re.Match, major: tuple[str, str], minor: tuple[str, str], zero: str) -> str:
    amount = m.group(1)
    parts = amount.split(".")
    if len(parts) > 2:
        return amount + " " + major[1]
    whole = int(parts[0]) if parts[0] else 0
    frac = int(parts[1].ljust(2, "0")) if len(parts) > 1 and parts[1] else 0
    major_word = major[0] if whole == 1 else major[1]
    minor_word = minor[0] if frac == 1 else minor[1]
    if whole and frac:
        return f"{whole} {major_word} and {frac} {minor_word}"
    if whole:
        return f"{whole} {major_word}"
    if frac:
        return f"{frac} {minor_word}"
    return zero


def _pounds(m: re.Match) -> str:
    return _money(m, ("pound", "pounds"), ("penny", "pence"), "zero pounds")


def _dollars(m: re.Match) -> str:
    return _money(m, ("dollar", "dollars"), ("cent", "cents"), "zero dollars")


def _decimal(m: re.Match) -> str:
    whole, frac = m.group(1).split(".")
    return whole + " point " + " ".join(frac)  # digit by digit (whitespace after the dot included)


def _fraction(m: re.Match) -> str:
    num, den = (int(x) for x in m.group(0).split("/"))
    eng = _inflect()
    num_words = eng.number_to_words(num)
    if den == 2:
        return f"{num_words} {'half' if num == 1 else 'halves'}"
    if den == 1:
        return num_words
    den_words = eng.ordinal(eng.number_to_words(den)) + ("s" if num > 1 else "")
    return f"{num_words} {den_words}"


def _ordinal(m: re.Match) -> str:
    return _inflect().number_to_words(m.group(0))


def _number(m: re.Match) -> str:
    eng = _inflect()
    num = int(m.group(0))
    if 1000 < num < 3000:  # read as a year
        if num == 2000:
            return "two thousand"
        if 2000 < num < 2010:
            return "two thousand " + eng.number_to_words(num % 100)
        if num % 100 == 0:
            return eng.number_to_words(num // 100) + " hundred"
        return eng.number_to_words(num, andword="", zero="oh", group=2).replace(", ", " ")
    return eng.number_to_words(num, andword="")


def _expand(text: str) -> str:
    text = _RE_LIST_ORDINAL.sub(_list_ordinal, text)
    while _RE_ARITH.search(text):
        text = _RE_ARITH.sub(_arith, text)
    text = _RE_NEGATIVE.sub(_negative, text)
    text = _RE_COMMA_NUMBER.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _RE_TIME.sub(_time, text)
    text = _RE_UNIT.sub(_unit, text)
    for rx in _RE_POUNDS:
        text = rx.sub(_pounds, text)
    for rx in _RE_DOLLARS:
        text = rx.sub(_dollars, text)
    text = _RE_DECIMAL.sub(_decimal, text)
    text = _RE_FRACTION.sub(_fraction, text)
    text = _RE_ORDINAL.sub(_ordinal, text)
    text = _RE_NUMBER.sub(_number, text)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    text = text.replace("%", " percent")
    text = re.sub(r"[^ A-Za-z'.,?!-]", "", text)
    text = re.sub(r"(?i)i\.e\.", "that is", text)
    text = re.sub(r"(?i)e\.g\.", "for example", text)
    # split runs of capitals into letters: every capital not at the start or after a space
    return re.sub(r"(?<!^)(?<![\s])([A-Z])", r" \1", text)


# upstream escapes these keys, so only the literal strings match (";" alone is left as is)
_LITERAL_MAP = {"[;:：，；]": ",", '["’]': "'", "。": ".", "！": "!", "？": "?"}
_RE_LITERAL_MAP = re.compile("|".join(re.escape(k) for k in _LITERAL_MAP))
_RE_REPEATED_PUNCT = re.compile(
    "([" + "".join(re.escape(p) for p in _PUNCT) + r"\s])([" + "".join(re.escape(p) for p in _PUNCT) + "])+"
)


def text_normalize(text: str) -> str:
    """Normalise English text as upstream does before G2P (see the module docstring).

    Raises:
        ValueError: for currency amounts upstream cannot parse either (e.g. ``"(5$"``).
    """
    text = _RE_LITERAL_MAP.sub(lambda m: _LITERAL_MAP[m.group(0)], text)
    text = _expand(text)
    # a punctuation mark (or space) followed by more punctuation keeps only the first (reference leak guard)
    return _RE_REPEATED_PUNCT.sub(r"\1", text)


# ---------------------------------------------------------------------------------------------
# neural G2P for out-of-vocabulary words (g2p_en checkpoint20.npz: GRU encoder-decoder)

_GRAPHEMES = ["<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz"]
_PHONEMES = ["<pad>", "<unk>", "<s>", "</s>",
             "AA0", "AA1", "AA2", "AE0", "AE1", "AE2", "AH0", "AH1", "AH2", "AO0", "AO1", "AO2",
             "AW0", "AW1", "AW2", "AY0", "AY1", "AY2", "B", "CH", "D", "DH", "EH0", "EH1", "EH2",
             "ER0", "ER1", "ER2", "EY0", "EY1", "EY2", "F", "G", "HH", "IH0", "IH1", "IH2",
             "IY0", "IY1", "IY2", "JH", "K", "L", "M", "N", "NG", "OW0", "OW1", "OW2",
             "OY0", "OY1", "OY2", "P", "R", "S", "SH", "T", "TH", "UH0", "UH1", "UH2", "UW",
             "UW0", "UW1", "UW2", "V", "W", "Y", "Z", "ZH"]  # fmt: skip
_G2IDX = {g: i for i, g in enumerate(_GRAPHEMES)}
_START_ID, _END_ID, _MAX_STEPS = 2, 3, 20


@lru_cache(maxsize=1)
def _gru_weights() -> dict[str, np.ndarray]:
    with np.load(_g2p_en_file("checkpoint20.npz")) as f:
        return {k: np.asarray(f[k], dtype=np.float32) for k in f.files}


def _gru_cell(x: np.ndarray, h: np.ndarray, w: dict[str, np.ndarray], pre: str) -> np.ndarray:
    # PyTorch GRU layout: rows [reset | update | new] of w_ih (3H, E) and w_hh (3H, H); x (1, E), h (1, H)
    gi = x @ w[pre + "w_ih"].T + w[pre + "b_ih"]
    gh = h @ w[pre + "w_hh"].T + w[pre + "b_hh"]
    hid = h.shape[-1]
    rz = 1 / (1 + np.exp(-(gi[:, : 2 * hid] + gh[:, : 2 * hid])))
    r, z = rz[:, :hid], rz[:, hid:]
    n = np.tanh(gi[:, 2 * hid :] + r * gh[:, 2 * hid :])
    return (1 - z) * n + z * h


def predict_oov(word: str) -> list[str]:
    """Phones of an unknown lower-case word from g2p_en's neural model (greedy, <= 20 phones)."""
    w = _gru_weights()
    ids = [_G2IDX.get(c, _G2IDX["<unk>"]) for c in word] + [_G2IDX["</s>"]]
    h = np.zeros((1, w["enc_w_hh"].shape[1]), np.float32)
    for i in ids:
        h = _gru_cell(w["enc_emb"][i][None], h, w, "enc_")
    prev, out = _START_ID, []
    for _ in range(_MAX_STEPS):
        h = _gru_cell(w["dec_emb"][prev][None], h, w, "dec_")
        pred = int((h @ w["fc_w"].T + w["fc_b"]).argmax())
        if pred == _END_ID:
            break
        out.append(pred)
        prev = pred
    return [_PHONEMES[i] if i < len(_PHONEMES) else "<unk>" for i in out]


# ---------------------------------------------------------------------------------------------
# G2P

_RE_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|[.,?!\-]")
_RE_POSSESSIVE = re.compile(r"^([a-z]+)('s)$")
_VOICELESS = frozenset(("P", "T", "K", "F", "TH", "HH"))
_SIBILANT = frozenset(("S", "Z", "SH", "ZH", "CH", "JH"))
_DROPPED = frozenset((" ", "<pad>", "UW", "</s>", "<s>"))


def _lookup(o_word: str) -> list[str]:
    """Dictionary / names / spelling / possessive / compound / neural, in upstream's order."""
    word = o_word.lower()
    cmu = _cmu()
    if len(word) > 1 and word in cmu:
        return cmu[word]
    if o_word.istitle() and word in _names():
        return _names()[word]
    if len(word) <= 3:  # short unknown word: spell it
        phones: list[str] = []
        for c in word:
            if c == "a":
                phones.append("EY1")
            elif not c.isalpha():
                phones.append(c)
            else:
                phones.extend(cmu[c])
        return phones
    if _RE_POSSESSIVE.match(word):
        phones = list(_lookup(word[:-2]))
        if phones[-1] in _VOICELESS:
            phones.append("S")
        elif phones[-1] in _SIBILANT:
            phones.extend(["AH0", "Z"])
        else:
            phones.append("Z")
        return phones
    parts = _wordsegment().segment(word)
    if len(parts) == 1:
        return predict_oov(word)
    return [p for part in parts for p in _lookup(part)]


def _pronounce(o_word: str, pos: str) -> list[str]:
    word = o_word.lower()
    if re.search("[a-z]", word) is None:
        return [word]
    if len(word) == 1:
        return ["EY1"] if o_word == "A" else _cmu()[word]
    homographs = _homographs()
    if word in homographs:
        pron1, pron2, pos1 = homographs[word]
        if pos.startswith(pos1) or (len(pos) < len(pos1) and pos == pos1[: len(pos)]):
            return pron1
        return pron2
    return _lookup(o_word)


def _finish(pron: list[str]) -> list[str]:
    out = []
    for ph in pron:
        if ph in _DROPPED:
            continue
        ph = "UNK" if ph == "<unk>" else ph
        if ph in _SYMBOL_SET:
            out.append(ph)
        elif ph == "'":
            out.append("-")
        else:  # upstream prints and drops these (e.g. the empty phones of a few dictionary entries)
            log.debug("dropping phone %r not in the symbol table", ph)
    return out


def pos_tags(text: str) -> list[tuple[str, str]] | None:
    """Tokens of normalised text with POS tags, or ``None`` when no token is a homograph.

    Upstream tags only sentences that contain a homograph (the tags decide nothing else).
    """
    words = _RE_TOKEN.findall(text)
    homographs = _homographs()
    if not any(re.search("[a-z]", w.lower()) and w.lower() in homographs for w in words):
        return None
    from .pos_tagger import pos_tag  # loads the tagger model on first use

    return pos_tag(words)


def g2p(text: str) -> list[str]:
    """Phones of normalised English text (the output of :func:`text_normalize`)."""
    tagged = pos_tags(text)
    if tagged is None:
        tagged = [(w, "") for w in _RE_TOKEN.findall(text)]
    phones: list[str] = []
    for word, pos in tagged:
        phones.extend(_finish(_pronounce(word, pos)))
    return phones


def clean_text_en(text: str) -> tuple[list[str], None, str]:
    """Upstream ``clean_text(text, "en", "v2")``: ``(phones, None, norm_text)``.

    Fewer than 4 phones get a leading ``","`` (upstream pads short English segments).

    Raises:
        ValueError: for text upstream cannot convert either (a malformed currency amount).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    try:
        norm_text = text_normalize(text)
    except ValueError as e:  # int() of an amount like "(5$": upstream fails the same way
        raise ValueError(f"cannot normalise English text {text!r}: {e}; fix the number or currency amount") from e
    phones = g2p(norm_text)
    if len(phones) < 4:
        phones = [",", *phones]
    return [p if p in _SYMBOL_SET else "UNK" for p in phones], None, norm_text
