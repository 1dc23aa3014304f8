"""Exact reference solvers for small instances (tests and sanity checks, not production).

Both solve  min sum_h curve_h(evicted_h)  s.t.  sum_h keep_h = total_keep,  min_keep_h <= keep_h <= T_h
by dynamic programming over heads, O(heads * E^2) for E total evictions:
`exact_relaxed` on each head's convex minorant, `exact_original` on the raw non-convex curves.
"""

import numpy as np

from .checks import as_count, as_curves, as_min_keep, check_total_keep, head_sizes
from .hull import convex_minorant


def _best_split(curves: list[np.ndarray], total_keep, min_keep) -> tuple[np.ndarray, float]:
    sizes = head_sizes(curves)
    min_keep = as_min_keep(min_keep, sizes)
    total_keep = as_count(total_keep, "total_keep")
    check_total_keep(total_keep, min_keep, sizes)
    total_evict = int(sizes.sum()) - total_keep
    best = np.full(total_evict + 1, np.inf)
    best[0] = 0.0
    choices = []
    j = np.arange(total_evict + 1)
    for curve, cap in zip(curves, sizes - min_keep, strict=True):
        e = np.arange(min(int(cap), total_evict) + 1)
        prev = j[:, None] - e[None, :]
        # cost[j, e]: best over earlier heads with j - e evictions, plus e evictions here.
        cost = np.where(prev >= 0, best[np.clip(prev, 0, None)], np.inf) + curve[e][None, :]
        pick = np.argmin(cost, axis=1)
        best = cost[j, pick]
        choices.append(pick)
    evicted = np.zeros(len(curves), dtype=np.int64)
    remaining = total_evict
    for h in range(len(curves) - 1, -1, -1):
        evicted[h] = choices[h][remaining]
        remaining -= evicted[h]
    return sizes - evicted, float(best[total_evict])


def exact_relaxed(cum_losses, total_keep, min_keep) -> tuple[np.ndarray, float]:
    """Optimal keep counts and loss of the hull-relaxed separable problem."""
    return _best_split([convex_minorant(c) for c in as_curves(cum_losses)], total_keep, min_keep)


def exact_original(cum_losses, total_keep, min_keep) -> tuple[np.ndarray, float]:
    """Optimal keep counts and loss on the original (possibly non-convex) curves."""
    return _best_split(as_curves(cum_losses), total_keep, min_keep)
