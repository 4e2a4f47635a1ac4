"""Sampling for the t2s GPT: small composable filters in upstream GPT-SoVITS's exact order.

Upstream (`AR/models/utils.py logits_to_probs` + `sample`, gptsovits_architecture.md 2.6):

1. repetition penalty on every id seen so far (prompt codes included), once per unique id:
   `s * rp` if `s < 0` else `s / rp`;
2. top-p on the penalised logits (before temperature): drop sorted entries whose cumulative
   probability exceeds `top_p`, always keeping the best one;
3. temperature: `logits / max(temperature, 1e-5)`;
4. top-k: keep logits `>=` the k-th largest (ties kept);
5. softmax;
6. draw by an exponential race, `argmax(probs / q)` with `q ~ Exp(1)`, which is a multinomial draw.

All functions take and return logits of shape (B, V) (float32). The EOS mask of the first decode
steps is a separate filter (`mask_token`) because it depends on the step index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

__all__ = [
    "apply_repetition_penalty",
    "mask_token",
    "apply_top_p",
    "apply_temperature",
    "apply_top_k",
    "logits_to_probs",
    "exponential_race",
    "seen_mask",
    "MIN_STEPS_BEFORE_EOS",
    "RowSampling",
    "sample_rows",
]

_NEG_INF = float("-inf")
# upstream infer_panel_naive drops the EOS column while idx < 11, so at least 11 codes precede a
# stop (its hard loop cap is constants.MAX_DECODE_STEPS)
MIN_STEPS_BEFORE_EOS = 11


def seen_mask(tokens: mx.array, vocab_size: int) -> mx.array:
    """Boolean (V,) mask of the ids present in `tokens` (any shape)."""
    flat = tokens.reshape(-1).astype(mx.int32)
    mask = mx.zeros((vocab_size,), dtype=mx.bool_)
    if flat.size == 0:
        return mask
    # duplicate ids write the same value: the penalty is per unique id, as upstream's scatter
    mask[flat] = True
    return mask


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Penalise the columns where `seen` (V,) is true: `s * p` if `s < 0` else `s / p`."""
    if penalty == 1.0:
        return logits
    penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalised, logits)


def mask_token(logits: mx.array, token_id: int) -> mx.array:
    """Set one column to -inf (upstream drops the EOS column for the first steps; same probabilities)."""
    column = mx.arange(logits.shape[-1]) == token_id
    return mx.where(column, mx.array(_NEG_INF, dtype=logits.dtype), logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Nucleus filter; a no-op unless `top_p < 1.0`. Applied before temperature, like upstream."""
    if top_p is None or top_p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)  # descending
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    cum = mx.cumsum(mx.softmax(sorted_logits, axis=-1, precise=True), axis=-1)
    first = mx.arange(logits.shape[-1]) == 0
    remove_sorted = mx.logical_and(cum > top_p, mx.logical_not(first))  # always keep the best one
    remove = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, remove_sorted, axis=-1)
    return mx.where(remove, mx.array(_NEG_INF, dtype=logits.dtype), logits)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    """`logits / max(temperature, 1e-5)`."""
    return logits / max(float(temperature), 1e-5)


def apply_top_k(logits: mx.array, top_k: int | None) -> mx.array:
    """Keep logits `>=` the k-th largest (ties kept); `None` or `k <= 0` keeps everything."""
    if top_k is None or top_k <= 0:
        return logits
    k = min(int(top_k), logits.shape[-1])
    pivot = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < pivot, mx.array(_NEG_INF, dtype=logits.dtype), logits)


def logits_to_probs(
    logits: mx.array,
    *,
    top_k: int | None = None,
    top_p: float = 1.0,
    temperature: float = 1.0,
) -> mx.array:
    """Already-penalised logits (B, V) -> probabilities (B, V): top-p, temperature, top-k, softmax."""
    logits = apply_top_p(logits, top_p)
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, top_k)
    return mx.softmax(logits, axis=-1, precise=True)


def exponential_race(probs: mx.array, key: mx.array | None = None) -> mx.array:
    """One draw per row of `probs` (B, V): `argmax(probs / q)`, `q ~ Exp(1)` i.i.d. -> (B,) int32."""
    u = mx.random.uniform(shape=probs.shape, key=key)
    q = -mx.log(u)  # u in [0, 1): q in (0, inf], so probs / q never divides by zero
    return mx.argmax(probs / q, axis=-1).astype(mx.int32)


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling settings: `T2S.generate`'s keyword arguments."""

    top_k: int | None = 5
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.35

    def key(self) -> tuple:
        return (self.top_k, self.top_p, self.temperature, self.repetition_penalty)


def sample_rows(logits: mx.array, seen: mx.array, keys: list[mx.array], eos_allowed: mx.array,
                 rows: Sequence[RowSampling], eos: int) -> tuple[mx.array, mx.array, list[mx.array]]:
    """Per-row sampling of `logits` (B, V): repetition penalty, the EOS mask where `eos_allowed` (B,) is
    false, upstream's filters, then an exponential race over each row's own uniforms (or the argmax
    for top-k 1); `stop` is true where the penalised argmax or the sample is EOS. Rows with equal
    settings are filtered together. The single-row decode (`T2S`) and the batched one both sample here.
    Returns tokens (B,), stop flags (B,) and the rows' next keys."""
    B = logits.shape[0]
    penalised = [None] * B
    tokens = [None] * B
    new_keys = []
    subs = []
    for key in keys:
        key, sub = mx.random.split(key)
        new_keys.append(key)
        subs.append(sub)
    groups: dict[tuple, list[int]] = {}
    for b, settings in enumerate(rows):
        groups.setdefault(settings.key(), []).append(b)
    for (top_k, top_p, temperature, penalty), members in groups.items():
        idx = mx.array(members)
        part = logits if len(members) == B else logits[idx]
        part_seen = seen if len(members) == B else seen[idx]
        part = apply_repetition_penalty(part, part_seen, penalty)
        allowed = eos_allowed if len(members) == B else eos_allowed[idx]
        part = mx.where(allowed[:, None], part, mask_token(part, eos))
        if top_k == 1:
            drawn = mx.argmax(part, axis=-1).astype(mx.int32)
        else:
            probs = logits_to_probs(part, top_k=top_k, top_p=top_p, temperature=temperature)
            u = mx.concatenate([mx.random.uniform(shape=(1, part.shape[-1]), key=subs[b]) for b in members])
            drawn = mx.argmax(probs / -mx.log(u), axis=-1).astype(mx.int32)
        if len(members) == B:  # one group (the usual case): no per-row slices to put back together
            penalised_all, token = part, drawn
            break
        for j, b in enumerate(members):
            penalised[b] = part[j]
            tokens[b] = drawn[j]
    else:
        penalised_all = mx.stack(penalised)
        token = mx.stack(tokens)
    stop = mx.logical_or(mx.argmax(penalised_all, axis=-1) == eos, token == eos)
    return token, stop, new_keys
