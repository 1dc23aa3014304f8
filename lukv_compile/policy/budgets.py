"""Budget policies: how many tokens each (layer, KV head) keeps.

Static policies are all expressed as a `Profile` (LU-KV's solved profile, uniform, PyramidKV,
StreamingLLM = uniform with the `streaming` scorer), and turned into keep counts here with LU-KV's
rounding. AdaKV is the one run-time policy: the per-layer total is fixed (that of uniform) and the
split over heads follows the scores; `adaptive_keep` does that split inside the eviction op.
KVzip's global selection (`global_keep_counts`) splits the whole model's total by the scores.
"""

from __future__ import annotations

import numpy as np
import torch

from lukv_compile.policy.selection import protect_and_mask
from lukv_compile.profile import Profile

POLICIES = ("lukv", "uniform", "pyramid", "adakv", "streaming")
ADAKV_FLOOR = 0.2  # AdaKV's safeguard: every head keeps at least this share of the uniform budget


def _hand_out(base: np.ndarray, weight: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """base [L, H] plus extra[l] units for layer l, one each to its heads of largest weight (ties: lower head)."""
    order = np.argsort(-weight, axis=1, kind="stable")
    bonus = np.arange(base.shape[1])[None, :] < extra[:, None]
    out = base.copy()
    np.put_along_axis(out, order, np.take_along_axis(base, order, axis=1) + bonus, axis=1)
    return out


def layer_keep_counts(prune: np.ndarray, length: int, floor: int = 1) -> np.ndarray:
    """LU-KV's rounding of one context of `length` tokens: prune [L, H] -> keep counts [L, H].

    Per layer the target is round(sum of ideal keeps (1 - r) T), held within [H f, H T] for the
    floor f = min(floor, T); every head is floored and the remainder goes one by one to the largest
    fractional parts (LU-KV's rounding). Heads below f are then raised to it and the layer pays for
    that: the tokens are taken back from its other heads in proportion to what each keeps above f
    (integer largest remainder, so the layer total is exact). Proportional, not largest-first,
    because taking from the biggest heads first would flatten exactly the heads the solver judged
    most valuable; proportional keeps the profile's relative budgets above the floor.
    Every head ends in [f, T] and each layer sums to its target exactly.
    """
    heads = prune.shape[1]
    floor = min(floor, length)
    ideal = (1.0 - prune.astype(np.float64)) * length
    rounded = np.rint(ideal.sum(axis=1)).astype(np.int64)
    base = np.floor(ideal).astype(np.int64)
    keep = _hand_out(base, ideal - base, rounded - base.sum(axis=1))
    target = np.clip(rounded, heads * floor, heads * length)
    raised = np.maximum(keep, floor)
    surplus = raised - floor
    excess = raised.sum(axis=1) - target  # tokens the floors cost, 0 <= excess <= surplus.sum()
    share = surplus * excess[:, None]  # exact integers: take_h = share_h / sum(surplus), rounded
    total = np.maximum(surplus.sum(axis=1, keepdims=True), 1)
    take = _hand_out(share // total, share % total, excess - (share // total).sum(axis=1))
    return raised - take


def keep_counts(profile: Profile, compression: float, lengths: list[int] | np.ndarray,
                protected: int) -> np.ndarray:
    """Keep counts [B, L, H] for contexts of the given real lengths; each layer sums to its target.

    `protected` = sink + window: tokens that are never evicted, so a head keeps at least that many
    (all of them when the context is shorter: then it is exact), and at least one (LU-KV's clamp).
    """
    prune = profile.fractions(compression)
    floor = max(protected, 1)
    return np.stack([layer_keep_counts(prune, length, floor)
                     for length in np.asarray(lengths, dtype=np.int64).tolist()])


def adaptive_keep(scores: torch.Tensor, totals: torch.Tensor, floor_share: float = ADAKV_FLOOR) -> torch.Tensor:
    """AdaKV split: keep counts [B, H] that sum to `totals[b]` per row, chosen from scores [B, H, T].

    Every head first keeps its top `floor_share * total / H` tokens; the rest of the row's budget goes
    to the highest remaining scores over all heads of the layer. Scores of -inf (padding) are never
    picked unless a row's budget exceeds its real tokens.
    """
    b, h, t = scores.shape
    held = (scores > float("-inf")).sum(dim=-1)  # [B, H] tokens each head can keep
    floor = torch.minimum((floor_share * totals.double() / h).floor().long()[:, None], held)  # [B, H]
    ranks = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    rest = scores.masked_fill(ranks < floor[..., None], float("-inf")).reshape(b, h * t)
    rest_ranks = rest.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1).view(b, h, t)
    remaining = totals - floor.sum(dim=-1)  # a short head's unused floor goes to the others
    extra = (rest_ranks < remaining[:, None, None]).sum(dim=-1)
    return (floor + extra).clamp(max=t)


def global_keep_counts(scores: torch.Tensor, counts: torch.Tensor, sink: int, window: int,
                       floor_share: float = 0.0) -> torch.Tensor:
    """[L, H] keep counts of KVzip's selection, one threshold over every head of every layer: as many tokens as
    `counts` [L, H] keeps in all, each head's protected (first `sink`, last `window`) tokens, and the rest by one
    top-r over every head's scores [L, H, P]. floor_share > 0: AdaKV's safeguard over the whole model, every head
    first keeps its top `floor_share` of the mean budget. Needs every layer's scores at once, so only a pass that
    sees the whole context first (compress_context) can apply it."""
    layers, heads, length = scores.shape
    flat = protect_and_mask(scores.reshape(1, layers * heads, length),
                            torch.ones(1, layers * heads, length, dtype=torch.bool, device=scores.device), sink, window)
    total = counts.sum().reshape(1).to(scores.device)
    return adaptive_keep(flat, total, floor_share).view(layers, heads).cpu()
