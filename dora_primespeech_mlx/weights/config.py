"""Configs from checkpoint files: plain nested data (walked once, depth-capped), JSON configs read
with a size cap, and the range checks every stage's config uses."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import MAX_DEPTH, MAX_EXPANDED, CheckpointError, short_repr

# ----------------------------------------------------------------------------------------- configs

def to_plain(obj: Any, *, source: str | Path = "config", max_depth: int = MAX_DEPTH) -> Any:
    """Convert HParams/OrderedDict nests into plain dicts and lists (for configs).

    Each container is converted once (a memo keyed by identity), so a config whose lists are shared
    many times over (pickle memo references) costs its size, not the number of paths through it;
    a shared sub-tree stays shared in the result. Nesting deeper than `max_depth` (which includes
    any cycle), or sharing that would expand the result past `MAX_EXPANDED` values when printed or
    copied, raises `CheckpointError` naming `source`.
    """
    done: dict[int, tuple[Any, int, int]] = {}  # id -> (plain value, height, expanded size)

    def walk(value: Any, depth: int) -> tuple[Any, int, int]:
        if not isinstance(value, (dict, list, tuple)):
            return value, 0, 1
        hit = done.get(id(value))
        if hit is None:
            if depth >= max_depth:
                raise CheckpointError(f"{source}: nests deeper than {max_depth} levels (or contains itself); "
                                      "a model config never does, the file is damaged or hostile")
            if isinstance(value, dict):
                pairs = [(k, walk(v, depth + 1)) for k, v in value.items()]
                out: Any = {k: v for k, (v, _h, _n) in pairs}
                subs = [r for _k, r in pairs]
            else:
                subs = [walk(v, depth + 1) for v in value]
                out = [v for v, _h, _n in subs]
            hit = (out, 1 + max((h for _v, h, _n in subs), default=0), 1 + sum(n for _v, _h, n in subs))
            if hit[2] > MAX_EXPANDED:
                raise CheckpointError(f"{source}: shared references make it expand to more than {MAX_EXPANDED:,} "
                                      "values; a model config never does, the file is damaged or hostile")
            done[id(value)] = hit
        if depth + hit[1] > max_depth:
            raise CheckpointError(f"{source}: nests deeper than {max_depth} levels; a model config never does, "
                                  "the file is damaged or hostile")
        return hit

    return walk(obj, 0)[0]


def check_int(where: str, name: str, value: Any, lo: int, hi: int) -> int:
    """`value` if it is an int (not a bool) in [lo, hi], else ValueError naming `where.name`."""
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{where}: {name}={short_repr(value)} must be an integer in [{lo}, {hi}]")
    return value


def check_float(where: str, name: str, value: Any, lo: float, hi: float, *, open_low: bool = False) -> float:
    """`value` if it is a finite number (int or float, not a bool) in [lo, hi] (or (lo, hi])."""
    ok = type(value) in (int, float) and math.isfinite(value) and (lo < value if open_low else lo <= value) \
        and value <= hi
    if not ok:
        raise ValueError(f"{where}: {name}={short_repr(value)} must be a number in {'(' if open_low else '['}{lo}, {hi}]")
    return value


def check_int_list(where: str, name: str, value: Any, lo: int, hi: int, *, min_len: int = 1,
                   max_len: int = 64) -> list[int]:
    """`value` if it is a list/tuple of min_len..max_len ints in [lo, hi]."""
    if not (isinstance(value, (list, tuple)) and min_len <= len(value) <= max_len
            and all(type(v) is int and lo <= v <= hi for v in value)):
        raise ValueError(f"{where}: {name}={short_repr(value)} must be a list of {min_len}-{max_len} integers "
                         f"in [{lo}, {hi}]")
    return list(value)


_MAX_JSON_CONFIG = 1024 * 1024  # an HF config.json is ~1-2 KB


def read_json_config(path: str | Path) -> dict[str, Any]:
    """An HF `config.json` as a dict: size-capped, valid JSON, an object, nesting at most MAX_DEPTH."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_JSON_CONFIG + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the HF model folder needs its config.json") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > _MAX_JSON_CONFIG:
        raise CheckpointError(f"{path}: larger than {_MAX_JSON_CONFIG:,} bytes; not an HF config.json")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({type(exc).__name__}); restore the original config.json") \
            from None
    return plain_config(value, path)


def plain_config(config: Any, source: str | Path) -> dict[str, Any]:
    """A checkpoint's `config` as plain nested dicts/lists; anything but a mapping is refused."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the config is a {type(config).__name__}, not a mapping; "
                              "the file is not a GPT-SoVITS checkpoint or is damaged")
    return to_plain(config, source=source)
