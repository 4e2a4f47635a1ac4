"""The GPT-SoVITS phone symbol tables (v1: 322 entries, v2: 732) and phone → id conversion.

The checkpoints' phone embeddings are indexed by position in these lists, so they are shipped as
data (``data/symbols_v2.json``, dumped once from upstream's live ``text.symbols2.symbols`` by
``tools/oracle/refs_text.py --dump-tables``) rather than recomputed: upstream builds them with a
Python ``sorted(set(...))`` whose exact inputs are easy to get subtly wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

# Punctuation that survives the Chinese normaliser, in upstream's order (it is used in regexes).
PUNCTUATION: tuple[str, ...] = ("!", "?", "…", ",", ".", "-")


@lru_cache(maxsize=None)
def load_json(name: str):
    """Read one of the package's data tables (``dora_primespeech_mlx/text/data/<name>``)."""
    path = resources.files(__package__).joinpath("data", name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"text frontend data file {name!r} is missing from the installed package ({path}); "
            "reinstall dora-primespeech-mlx (package data must include text/data/*.json)"
        ) from e


_table = load_json("symbols_v2.json")
symbols: list[str] = list(_table["symbols"])  # v2 (732)
symbols_v1: list[str] = symbols[: int(_table["v1_size"])]  # v1 (322) is a prefix of v2
assert len(symbols) == 732 and len(symbols_v1) == 322, "corrupt data/symbols_v2.json"

_SYMBOL_TO_ID = {s: i for i, s in enumerate(symbols)}
_SYMBOL_TO_ID_V1 = {s: i for i, s in enumerate(symbols_v1)}


def cleaned_text_to_sequence(phones: Iterable[str], version: str = "v2") -> list[int]:
    """Map phone symbols (as returned by :func:`clean_text`) to the model's integer ids.

    Args:
        phones: phone symbols, e.g. ``["n", "i2", "h", "ao3"]``.
        version: ``"v2"`` (732-symbol table; also used by v2Pro) or ``"v1"`` (322 symbols).

    Raises:
        ValueError: for an unknown version or a symbol outside the table.
    """
    if version == "v1":
        table = _SYMBOL_TO_ID_V1
    elif version in ("v2", "v2Pro", "v2ProPlus"):
        table = _SYMBOL_TO_ID
    else:
        raise ValueError(f"unknown symbol-table version {version!r}; use 'v1' or 'v2'")
    ids = []
    for ph in phones:
        try:
            ids.append(table[ph])
        except KeyError:
            raise ValueError(
                f"phone {ph!r} is not in the {version} symbol table; phones must come from clean_text()"
            ) from None
    return ids
