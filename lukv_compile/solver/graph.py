"""Head graph of a model: which KV heads are storage units, who reads them, where they live.

Nodes: ("kv", layer, kv_head) storage units (attrs kind, layer, kv_head, shard, excluded) and
("q", layer, q_head) query heads (attrs kind, layer, q_head, shard) with one edge to the KV head
that serves them (GQA: q head qh reads kv head qh // (num_q_heads // num_kv_heads)). Excluded
layers (e.g. Gemma 3 sliding-window layers) stay in the graph but are left out of allocation.
Tensor parallelism shards heads in contiguous blocks, as transformers' TP plans do.

The solver reads allocation units and constraint groups (per layer, per shard) from this graph;
`allocate_balanced` (one budget) and `sweep_balanced` (every ratio) keep the tokens each device
stores within a tolerance of each other.
"""

import math
from collections.abc import Mapping

import networkx as nx
import numpy as np

from .checks import as_count, check_total_keep
from .greedy import DEFAULT_RATIOS, EvictionPlan, check_ratios, keep_targets, nested_evictions, plan_evictions

Unit = tuple[str, int, int]


def _positive(value, name: str) -> int:
    n = as_count(value, name)
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def build_head_graph(
    num_layers: int, num_kv_heads: int, num_q_heads: int, excluded_layers=(), shards: int = 1
) -> nx.Graph:
    """Graph of KV storage units and query heads for one model; see the module docstring."""
    num_layers = _positive(num_layers, "num_layers")
    num_kv_heads = _positive(num_kv_heads, "num_kv_heads")
    num_q_heads = _positive(num_q_heads, "num_q_heads")
    shards = _positive(shards, "shards")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if num_kv_heads % shards:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} cannot be split over shards={shards}: "
            "tensor parallelism needs num_kv_heads % shards == 0"
        )
    excluded = {as_count(layer, "excluded layer") for layer in excluded_layers}
    bad = sorted(layer for layer in excluded if not 0 <= layer < num_layers)
    if bad:
        raise ValueError(f"excluded_layers {bad} outside 0..{num_layers - 1}")

    group = num_q_heads // num_kv_heads
    kv_per_shard = num_kv_heads // shards
    graph = nx.Graph(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        num_q_heads=num_q_heads,
        shards=shards,
        excluded_layers=tuple(sorted(excluded)),
    )
    for layer in range(num_layers):
        for g in range(num_kv_heads):
            graph.add_node(
                ("kv", layer, g), kind="kv", layer=layer, kv_head=g,
                shard=g // kv_per_shard, excluded=layer in excluded,
            )
        for qh in range(num_q_heads):
            g = qh // group
            graph.add_node(("q", layer, qh), kind="q", layer=layer, q_head=qh, shard=g // kv_per_shard)
            graph.add_edge(("q", layer, qh), ("kv", layer, g))
    return graph


def allocation_units(graph: nx.Graph) -> list[Unit]:
    """KV heads that get a budget (excluded layers left out), ordered by (layer, kv_head)."""
    return sorted(n for n, d in graph.nodes(data=True) if d["kind"] == "kv" and not d["excluded"])


def unit_attr(graph: nx.Graph, attr: str) -> np.ndarray:
    """One attribute ("layer", "kv_head" or "shard") of every allocation unit, in unit order."""
    if attr not in ("layer", "kv_head", "shard"):
        raise ValueError(f"attr must be 'layer', 'kv_head' or 'shard', got {attr!r}")
    return np.array([graph.nodes[u][attr] for u in allocation_units(graph)], dtype=np.int64)


def unit_groups(graph: nx.Graph, attr: str) -> list[np.ndarray]:
    """Constraint groups: indices into allocation_units sharing a layer (attr="layer") or a shard."""
    values = unit_attr(graph, attr)
    return [np.flatnonzero(values == v) for v in np.unique(values)]


def _rank_within(ids: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions carry the same id."""
    perm = np.argsort(ids, kind="stable")
    sorted_ids = ids[perm]
    first = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.empty_like(perm)
    rank[perm] = np.arange(ids.size) - first
    return rank


def _shard_window(total_keep: int, n_shards: int, tolerance: float) -> tuple[int, int]:
    """Integer [lo, hi] per-shard keep window with hi - lo <= max(tolerance * mean, 1)."""
    mean = total_keep / n_shards
    lo, hi = math.ceil(mean * (1 - tolerance / 2)), math.floor(mean * (1 + tolerance / 2))
    if not lo * n_shards <= total_keep <= hi * n_shards:
        lo, hi = math.floor(mean), math.ceil(mean)
    return lo, hi


def _ordered_inputs(units: list[Unit], cum_losses_by_unit: Mapping, min_keep):
    unit_set = set(units)
    missing = [u for u in units if u not in cum_losses_by_unit]
    extra = [u for u in cum_losses_by_unit if u not in unit_set]
    if missing or extra:
        raise ValueError(f"cum_losses_by_unit must cover exactly the allocation units; "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    curves = [cum_losses_by_unit[u] for u in units]
    if isinstance(min_keep, Mapping):
        min_keep = np.array([min_keep[u] for u in units])
    return curves, min_keep


def _balanced_keep(plan: EvictionPlan, shard_of_head: np.ndarray, n_shards: int, total_keep: int,
                   tolerance: float) -> np.ndarray:
    """Keep per head summing to total_keep with every shard's total in its window (see allocate_balanced)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    shard_size = np.bincount(shard_of_head, weights=plan.sizes, minlength=n_shards).astype(np.int64)
    shard_floor = np.bincount(shard_of_head, weights=plan.min_keep, minlength=n_shards).astype(np.int64)
    lo, hi = _shard_window(total_keep, n_shards, tolerance)
    keep_lo, keep_hi = np.maximum(shard_floor, lo), np.minimum(shard_size, hi)
    if np.any(keep_lo > keep_hi) or not keep_lo.sum() <= total_keep <= keep_hi.sum():
        raise ValueError(
            f"no balanced allocation for total_keep={total_keep}: shard keep window [{lo}, {hi}] "
            f"(tolerance={tolerance}) vs shard sizes {shard_size.tolist()} "
            f"and min_keep floors {shard_floor.tolist()}"
        )
    total_evict = int(plan.sizes.sum()) - total_keep
    token_shard = shard_of_head[plan.token_head]
    rank = _rank_within(token_shard)
    must = (shard_size - keep_hi)[token_shard]
    may = (shard_size - keep_lo)[token_shard]
    optional = np.flatnonzero((rank >= must) & (rank < may))
    taken = rank < must
    taken[optional[: total_evict - int(taken.sum())]] = True
    return plan.sizes - np.bincount(plan.token_head[taken], minlength=plan.n_heads)


def allocate_balanced(
    graph: nx.Graph, cum_losses_by_unit: Mapping, total_keep: int, min_keep, tolerance: float = 0.05
) -> tuple[dict[Unit, int], dict]:
    """Greedy allocation whose per-shard kept totals stay within `tolerance` of each other.

    Every shard's total keep is held in a window [lo, hi] around total_keep / shards with
    hi - lo <= max(tolerance * mean, 1 token). Within that, the allocation is the optimum of the
    hull-relaxed problem: each shard first evicts the cheapest tokens it must (to get under hi),
    then the remaining evictions follow the global cost order, skipping shards already at lo.
    min_keep: int, one value per allocation unit (unit order), or a mapping unit -> int.
    Returns keep per unit and a report of the loss with and without the balance constraint.
    """
    tolerance = float(tolerance)
    units = allocation_units(graph)
    curves, min_keep = _ordered_inputs(units, cum_losses_by_unit, min_keep)
    plan = plan_evictions(curves, min_keep)
    total_keep = as_count(total_keep, "total_keep")
    check_total_keep(total_keep, plan.min_keep, plan.sizes)
    shard_of_head = unit_attr(graph, "shard")
    n_shards = graph.graph["shards"]
    keep = _balanced_keep(plan, shard_of_head, n_shards, total_keep, tolerance)
    total_evict = int(plan.sizes.sum()) - total_keep
    free_keep = plan.sizes - nested_evictions(plan.token_head, plan.n_heads, np.array([total_evict]))[0]

    def shard_totals(k: np.ndarray) -> list[int]:
        return np.bincount(shard_of_head, weights=k, minlength=n_shards).astype(np.int64).tolist()

    relaxed_free, relaxed_balanced = plan.relaxed_loss(free_keep), plan.relaxed_loss(keep)
    report = {
        "tolerance": tolerance,
        "shard_keep_window": _shard_window(total_keep, n_shards, tolerance),
        "shard_keep_free": shard_totals(free_keep),
        "shard_keep_balanced": shard_totals(keep),
        "relaxed_loss_free": relaxed_free,
        "relaxed_loss_balanced": relaxed_balanced,
        "constraint_cost": relaxed_balanced - relaxed_free,
        "original_loss_free": plan.original_loss(free_keep),
        "original_loss_balanced": plan.original_loss(keep),
    }
    return {u: int(k) for u, k in zip(units, keep, strict=True)}, report


def sweep_balanced(graph: nx.Graph, cum_losses, min_keep, ratios=DEFAULT_RATIOS,
                   tolerance: float = 0.05) -> np.ndarray:
    """`sweep` (global scope) with `allocate_balanced`'s shard constraint: prune [len(ratios), units].

    cum_losses: one curve per allocation unit, in unit order.
    """
    ratios = check_ratios(ratios)
    plan = plan_evictions(cum_losses, min_keep)
    units = allocation_units(graph)
    if plan.n_heads != len(units):
        raise ValueError(f"got {plan.n_heads} curves for {len(units)} allocation units")
    shard_of_head, n_shards = unit_attr(graph, "shard"), graph.graph["shards"]
    targets = keep_targets(plan, np.arange(plan.n_heads), ratios)
    keep = np.stack([_balanced_keep(plan, shard_of_head, n_shards, int(t), float(tolerance)) for t in targets])
    return 1.0 - keep / plan.sizes
