"""LU-KV's greedy budget allocation over per-head loss curves.

Conventions: head h has T_h evictable tokens and a curve cum_loss_h of length T_h + 1, where
cum_loss_h[k] is the loss after evicting its k lowest-ranked tokens. keep_h = T_h - evicted_h.

The paper's greedy starts with every head keeping everything and repeatedly evicts one token from
the head whose next hull marginal cost is cheapest (ties: lower head index), while that head keeps
more than min_keep. On hull curves each head's marginal costs are non-decreasing and every token of
a hull segment costs the segment's slope, so that heap greedy evicts tokens in exactly the order
of a stable sort of all segment slopes (head-major, so ties go to the lower head index). One sorted
order therefore answers every budget at once, and solutions for growing compression are nested.
"""

from dataclasses import dataclass

import numpy as np

from .checks import as_count, as_curves, as_min_keep, check_total_keep, head_sizes
from .hull import HullSegments, hull_segments

# The paper's sweep: compression 1%..99%, row i <-> rho = (i + 1) / 100.
DEFAULT_RATIOS = np.arange(1, 100) / 100


@dataclass(frozen=True)
class EvictionPlan:
    """Hull segments of every head plus the greedy global eviction order (one head id per token)."""

    curves: list[np.ndarray]
    sizes: np.ndarray  # T_h
    min_keep: np.ndarray
    segments: HullSegments
    token_head: np.ndarray  # head evicted at each greedy step, cheapest first

    @property
    def n_heads(self) -> int:
        return self.sizes.size

    def relaxed_loss(self, keep: np.ndarray) -> float:
        """Sum over heads of the hull (convex minorant) loss at the given keep counts."""
        evicted = self.sizes - np.asarray(keep)
        seg = self.segments
        used = np.clip(evicted[seg.head] - seg.start, 0, seg.end - seg.start)
        return float(sum(c[0] for c in self.curves) + np.sum(seg.slope * used))

    def original_loss(self, keep: np.ndarray) -> float:
        """Sum over heads of the original (non-convex) curve at the given keep counts."""
        evicted = self.sizes - np.asarray(keep)
        return float(sum(c[e] for c, e in zip(self.curves, evicted, strict=True)))


def plan_evictions(cum_losses, min_keep) -> EvictionPlan:
    """Hull every curve and sort all evictable hull tokens into the greedy order."""
    curves = as_curves(cum_losses)
    sizes = head_sizes(curves)
    min_keep = as_min_keep(min_keep, sizes)
    seg = hull_segments(curves)
    # Tokens past T_h - min_keep_h may never be evicted, so clip each head's segments there.
    cap = (sizes - min_keep)[seg.head]
    lengths = np.clip(np.minimum(seg.end, cap) - seg.start, 0, None)
    live = np.flatnonzero(lengths > 0)
    # Stable sort of head-major segments == heap greedy with ties broken by head index.
    order = live[np.argsort(seg.slope[live], kind="stable")]
    token_head = np.repeat(seg.head[order], lengths[order])
    return EvictionPlan(curves, sizes, min_keep, seg, token_head)


def nested_evictions(token_head: np.ndarray, n_heads: int, targets: np.ndarray) -> np.ndarray:
    """Per-head eviction counts [len(targets), n_heads] after the first `t` steps of an order.

    Counts are accumulated over the targets in sorted order, so all targets cost one pass.
    """
    out = np.zeros((targets.size, n_heads), dtype=np.int64)
    counts = np.zeros(n_heads, dtype=np.int64)
    done = 0
    for i in np.argsort(targets, kind="stable"):
        counts += np.bincount(token_head[done : targets[i]], minlength=n_heads)
        done = int(targets[i])
        out[i] = counts
    return out


def _group_evictions(plan: EvictionPlan, groups: list[np.ndarray], keep_targets: np.ndarray) -> np.ndarray:
    """Evictions [n_targets, heads] when group g must keep keep_targets[g, i] tokens in total.

    Restricting the global order to a group's heads gives that group's own greedy order.
    """
    evicted = np.zeros((keep_targets.shape[1], plan.n_heads), dtype=np.int64)
    head_group = np.empty(plan.n_heads, dtype=np.int64)
    for g, heads in enumerate(groups):
        head_group[heads] = g
    token_group = head_group[plan.token_head] if len(groups) > 1 else None
    for g, heads in enumerate(groups):
        seq = plan.token_head if token_group is None else plan.token_head[token_group == g]
        evict_targets = plan.sizes[heads].sum() - keep_targets[g]
        evicted += nested_evictions(seq, plan.n_heads, evict_targets)
    return evicted


def _as_groups(groups, n_heads: int) -> list[np.ndarray]:
    """Check that groups partition 0..n_heads-1 (each head in exactly one group)."""
    out = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
    if not out:
        raise ValueError("groups is empty: need at least one group of head indices")
    flat = np.concatenate(out)
    if flat.size and (flat.min() < 0 or flat.max() >= n_heads):
        raise ValueError(f"groups contain head index outside 0..{n_heads - 1}: {sorted(set(flat.tolist()))}")
    seen = np.bincount(flat, minlength=n_heads)
    if np.any(seen != 1):
        h = int(np.flatnonzero(seen != 1)[0])
        raise ValueError(f"groups must partition the heads; head {h} appears {seen[h]} times")
    return out


def allocate(cum_losses, total_keep, min_keep, groups=None) -> np.ndarray:
    """Greedy keep counts per head with sum(keep) == total_keep and keep_h >= min_keep_h.

    cum_losses: list of 1-D curves (lengths T_h + 1) or a 2-D array [heads, T + 1].
    groups: optional partition of head indices; then total_keep holds one target per group and
    each group is allocated independently (e.g. one group per layer or per device).
    """
    plan = plan_evictions(cum_losses, min_keep)
    if groups is None:
        group_list = [np.arange(plan.n_heads)]
        targets = [as_count(total_keep, "total_keep")]
    else:
        group_list = _as_groups(groups, plan.n_heads)
        targets = [as_count(t, "total_keep entry") for t in np.asarray(total_keep).reshape(-1)]
        if len(targets) != len(group_list):
            raise ValueError(f"total_keep has {len(targets)} entries but there are {len(group_list)} groups")
    for g, (heads, target) in enumerate(zip(group_list, targets, strict=True)):
        where = "" if groups is None else f" (group {g})"
        check_total_keep(target, plan.min_keep[heads], plan.sizes[heads], where)
    keep_targets = np.array(targets, dtype=np.int64)[:, None]
    return plan.sizes - _group_evictions(plan, group_list, keep_targets)[0]


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def check_ratios(ratios) -> np.ndarray:
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.ndim != 1 or ratios.size == 0 or np.any(~np.isfinite(ratios)):
        raise ValueError(f"ratios must be a non-empty 1-D array of finite numbers, got {ratios!r}")
    if np.any((ratios < 0) | (ratios > 1)):
        raise ValueError(f"ratios must lie in [0, 1], got min {ratios.min()} max {ratios.max()}")
    return ratios


def keep_targets(plan: EvictionPlan, heads: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Tokens `heads` keep together at each ratio: round((1 - rho) T), raised to their min_keep floor."""
    size = plan.sizes[heads].sum()
    return np.clip(_round_half_up((1.0 - ratios) * size), plan.min_keep[heads].sum(), size)


def sweep(
    cum_losses,
    min_keep,
    ratios=DEFAULT_RATIOS,
    scope: str = "global",
    layer_of_head=None,
) -> np.ndarray:
    """Prune fractions r = 1 - keep/T, shape [len(ratios), heads], for every compression ratio.

    A ratio rho asks the scope (all heads, or each layer on its own when scope="layer") to keep
    round((1 - rho) * T_scope) tokens, raised to sum(min_keep) when that floor binds (the greedy
    then stops with every head at min_keep, as in the paper).
    """
    ratios = check_ratios(ratios)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if (scope == "layer") != (layer_of_head is not None):
        raise ValueError("layer_of_head is required with scope='layer' and only allowed with it")
    plan = plan_evictions(cum_losses, min_keep)
    if scope == "global":
        groups = [np.arange(plan.n_heads)]
    else:
        layers = np.asarray(layer_of_head).reshape(-1)
        if layers.size != plan.n_heads:
            raise ValueError(f"layer_of_head has {layers.size} entries, need one per head ({plan.n_heads})")
        groups = [np.flatnonzero(layers == layer) for layer in np.unique(layers)]
    targets = np.stack([keep_targets(plan, heads, ratios) for heads in groups])
    return _group_evictions(plan, groups, targets) / plan.sizes
