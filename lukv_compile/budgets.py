"""Budget policies: how many tokens each (layer, KV head) keeps.

Static policies are all expressed as a `Profile` (LU-KV's solved profile, uniform, PyramidKV,
StreamingLLM = uniform with the `streaming` scorer), and turned into keep counts here with LU-KV's
rounding. AdaKV is the one run-time policy: the per-layer total is fixed (that of uniform) and the
split over heads follows the scores; `adaptive_keep` does that split inside the eviction op.
"""

from __future__ import annotations

import numpy as np
import torch

from lukv_compile.profile import Profile

POLICIES = ("lukv", "uniform", "pyramid", "adakv", "streaming")
ADAKV_FLOOR = 0.2  # AdaKV's safeguard: every head keeps at least this share of the uniform budget


def layer_keep_counts(prune: np.ndarray, length: int) -> np.ndarray:
    """LU-KV's rounding of one context of `length` tokens: prune [L, H] -> keep counts [L, H].

    Per layer: the target is round(sum of ideal keeps); floor every head, then hand the remainder one
    by one to the largest fractional parts; clamp to [1, T].
    """
    ideal = (1.0 - prune.astype(np.float64)) * length
    target = np.rint(ideal.sum(axis=1)).astype(np.int64)
    keep = np.floor(ideal).astype(np.int64)
    remainder = target - keep.sum(axis=1)
    order = np.argsort(-(ideal - keep), axis=1, kind="stable")
    bonus = np.arange(prune.shape[1])[None, :] < remainder[:, None]
    np.put_along_axis(keep, order, np.take_along_axis(keep, order, axis=1) + bonus, axis=1)
    return np.clip(keep, 1, length)


def keep_counts(profile: Profile, compression: float, lengths: list[int] | np.ndarray,
                protected: int) -> np.ndarray:
    """Keep counts [B, L, H] for contexts of the given real lengths.

    `protected` = sink + window: tokens that are never evicted, so a head keeps at least that many
    (all of them when the context is shorter: then it is exact).
    """
    prune = profile.fractions(compression)
    rows = []
    for length in np.asarray(lengths, dtype=np.int64).tolist():
        keep = layer_keep_counts(prune, length) if length > 0 else np.zeros(prune.shape, dtype=np.int64)
        rows.append(np.clip(keep, min(length, protected), length))
    return np.stack(rows)


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
