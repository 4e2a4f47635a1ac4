"""Offline English part-of-speech tagger for homograph disambiguation.

Upstream (GPT-SoVITS ``text/english.py``) calls ``nltk.pos_tag``, whose model must be downloaded
(``averaged_perceptron_tagger_eng``); nothing may reach the network here. This is the same
algorithm -- Matthew Honnibal's greedy averaged perceptron with its 14 feature templates, which is
what ``nltk.pos_tag`` runs -- over the Penn-Treebank model that the PyPI package
``textblob-aptagger`` ships in its wheel (``trontagger-0.1.0.pickle``, MIT). The package itself is
never imported (it needs a long-gone ``textblob.packages``); only its model file is read, with an
unpickler that admits nothing but builtin containers.

Deviation: nltk's own model file may differ from this one, so a tag (and with it the reading of a
homograph such as "read" or "record") can differ from upstream on some sentences.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

__all__ = ["pos_tag"]

_MODEL_FILE = "trontagger-0.1.0.pickle"
_START = ("-START-", "-START2-")
_END = ("-END-", "-END2-")


class _BuiltinsOnly(pickle.Unpickler):
    """The model pickle holds dicts, strings, floats and sets; refuse anything that could run code."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "dict", "list", "tuple"):
            return {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}[name]
        raise pickle.UnpicklingError(f"{_MODEL_FILE}: refusing to load global {module}.{name}")


@lru_cache(maxsize=1)
def _model() -> tuple[dict, dict, tuple]:
    spec = importlib.util.find_spec("textblob_aptagger")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "English homographs need the POS-tagger model shipped by 'textblob-aptagger'; "
            "install it with `pip install textblob-aptagger` (reinstall dora-primespeech-mlx to get all its dependencies)"
        )
    path = Path(spec.submodule_search_locations[0]) / _MODEL_FILE
    with open(path, "rb") as fh:
        weights, tagdict, classes = _BuiltinsOnly(fh, encoding="latin1").load()
    # sorted: ties are broken by the label itself, so the order only has to be fixed
    return weights, tagdict, tuple(sorted(classes))


def _normalize(word: str) -> str:
    if "-" in word and word[0] != "-":
        return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
        return "!YEAR"
    if word and word[0].isdigit():
        return "!DIGITS"
    return word.lower()


def _features(i: int, word: str, context: list[str], prev: str, prev2: str) -> dict[str, int]:
    feats: dict[str, int] = defaultdict(int)
    i += len(_START)
    templates = (
        ("bias",),
        ("i suffix", word[-3:]),
        ("i pref1", word[0] if word else ""),
        ("i-1 tag", prev),
        ("i-2 tag", prev2),
        ("i tag+i-2 tag", prev, prev2),
        ("i word", context[i]),
        ("i-1 tag+i word", prev, context[i]),
        ("i-1 word", context[i - 1]),
        ("i-1 suffix", context[i - 1][-3:]),
        ("i-2 word", context[i - 2]),
        ("i+1 word", context[i + 1]),
        ("i+1 suffix", context[i + 1][-3:]),
        ("i+2 word", context[i + 2]),
    )
    for parts in templates:
        feats[" ".join(parts)] += 1
    return feats


def _predict(weights: dict, classes: tuple, feats: dict[str, int]) -> str:
    scores: dict[str, float] = defaultdict(float)
    for feat, value in feats.items():
        row = weights.get(feat)
        if row is None or value == 0:
            continue
        for label, w in row.items():
            scores[label] += value * w
    return max(classes, key=lambda label: (scores[label], label))


def pos_tag(words: list[str]) -> list[tuple[str, str]]:
    """Penn-Treebank tags for one pre-tokenised sentence, like ``nltk.pos_tag(words)``.

    Args:
        words: tokens (words and punctuation marks), in order.

    Returns:
        ``[(word, tag), ...]`` of the same length, e.g. ``("record", "VB")``.
    """
    weights, tagdict, classes = _model()
    context = [*_START, *(_normalize(w) for w in words), *_END]
    prev, prev2 = _START
    out = []
    for i, word in enumerate(words):
        tag = tagdict.get(word)
        if not tag:
            tag = _predict(weights, classes, _features(i, word, context, prev, prev2))
        out.append((word, tag))
        prev2, prev = prev, tag
    return out
