"""LU-KV budget solver: hull-relaxed greedy allocation of per-head KV keep counts.

Input: per (layer, KV head) cumulative-loss curves from the profiler. Output: keep counts for one
budget (`allocate`) or prune fractions for every compression ratio (`sweep`).
"""

from .exact import exact_original, exact_relaxed
from .graph import (
    allocate_balanced,
    allocation_units,
    build_head_graph,
    sweep_balanced,
    unit_attr,
    unit_groups,
)
from .greedy import allocate, plan_evictions, sweep
from .hull import convex_minorant

__all__ = [
    "allocate",
    "allocate_balanced",
    "allocation_units",
    "build_head_graph",
    "convex_minorant",
    "exact_original",
    "exact_relaxed",
    "plan_evictions",
    "sweep",
    "sweep_balanced",
    "unit_attr",
    "unit_groups",
]
