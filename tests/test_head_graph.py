"""Tests for the head graph (GQA, excluded layers, TP shards) and shard-balanced allocation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lukv_compile.solver import (
    allocate,
    allocate_balanced,
    allocation_units,
    build_head_graph,
    exact_relaxed,
    sweep_balanced,
    unit_attr,
    unit_groups,
)

SETTINGS = settings(max_examples=40, deadline=None)


def test_gqa_edges_and_attributes():
    graph = build_head_graph(num_layers=2, num_kv_heads=2, num_q_heads=6)
    assert graph.number_of_nodes() == 2 * (2 + 6)
    for qh in range(6):
        assert list(graph.neighbors(("q", 1, qh))) == [("kv", 1, qh // 3)]
    assert sorted(graph.neighbors(("kv", 0, 1))) == [("q", 0, 3), ("q", 0, 4), ("q", 0, 5)]
    assert graph.nodes["kv", 1, 0] == {"kind": "kv", "layer": 1, "kv_head": 0, "shard": 0, "excluded": False}


def test_excluded_layers_are_marked_and_left_out():
    graph = build_head_graph(num_layers=4, num_kv_heads=2, num_q_heads=4, excluded_layers=(0, 2))
    assert graph.nodes["kv", 2, 1]["excluded"] and not graph.nodes["kv", 1, 1]["excluded"]
    assert allocation_units(graph) == [("kv", 1, 0), ("kv", 1, 1), ("kv", 3, 0), ("kv", 3, 1)]
    assert [g.tolist() for g in unit_groups(graph, "layer")] == [[0, 1], [2, 3]]
    # Query heads of excluded layers are still there, still wired to their KV head.
    assert list(graph.neighbors(("q", 0, 3))) == [("kv", 0, 1)]


def test_shards_are_contiguous_blocks_of_kv_heads():
    graph = build_head_graph(num_layers=2, num_kv_heads=8, num_q_heads=32, shards=4)
    assert unit_attr(graph, "shard").tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2
    assert [g.tolist() for g in unit_groups(graph, "shard")] == [[0, 1, 8, 9], [2, 3, 10, 11],
                                                                [4, 5, 12, 13], [6, 7, 14, 15]]
    # A query head lives on the device of the KV head it reads.
    for node, data in graph.nodes(data=True):
        if data["kind"] == "q":
            (kv,) = graph.neighbors(node)
            assert data["shard"] == graph.nodes[kv]["shard"] == data["q_head"] // 8


def test_graph_errors():
    with pytest.raises(ValueError, match="num_kv_heads=6 cannot be split over shards=4"):
        build_head_graph(2, 6, 12, shards=4)
    with pytest.raises(ValueError, match="num_q_heads=6 must be a multiple of num_kv_heads=4"):
        build_head_graph(2, 4, 6)
    with pytest.raises(ValueError, match=r"excluded_layers \[5\] outside 0..1"):
        build_head_graph(2, 2, 2, excluded_layers=[5])
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        build_head_graph(0, 2, 2)
    with pytest.raises(ValueError, match="attr must be"):
        unit_attr(build_head_graph(1, 1, 1), "q_head")


@st.composite
def sharded_problem(draw, shard_counts=(1, 2, 3)):
    shards = draw(st.sampled_from(shard_counts))
    kv_heads = shards * draw(st.integers(1, 2))
    layers = draw(st.integers(1, 3))
    graph = build_head_graph(layers, kv_heads, kv_heads * 2, shards=shards)
    units = allocation_units(graph)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Per-unit cost scales differ a lot so the free allocation is usually unbalanced.
    curves = {u: np.concatenate([[0.0], np.cumsum(rng.random(rng.integers(4, 10)) * rng.choice([0.1, 10]))])
              for u in units}
    min_keep = draw(st.integers(0, 2))
    total = sum(c.size - 1 for c in curves.values())
    total_keep = draw(st.integers(min_keep * len(units), total))
    tolerance = draw(st.sampled_from([0.0, 0.05, 0.3]))
    return graph, curves, total_keep, min_keep, tolerance


def _solve_or_skip(graph, curves, total_keep, min_keep, tolerance):
    try:
        return allocate_balanced(graph, curves, total_keep, min_keep, tolerance)
    except ValueError as err:
        assert "no balanced allocation" in str(err)
        return None


@SETTINGS
@given(sharded_problem())
def test_balanced_allocation_respects_tolerance_and_costs_something(case):
    graph, curves, total_keep, min_keep, tolerance = case
    solved = _solve_or_skip(graph, curves, total_keep, min_keep, tolerance)
    if solved is None:
        return
    keep, report = solved
    units = allocation_units(graph)
    assert sum(keep.values()) == total_keep
    assert all(min_keep <= keep[u] <= curves[u].size - 1 for u in units)
    totals = np.bincount(unit_attr(graph, "shard"), weights=[keep[u] for u in units]).astype(int)
    assert totals.tolist() == report["shard_keep_balanced"]
    mean = total_keep / graph.graph["shards"]
    assert totals.max() - totals.min() <= max(tolerance * mean, 1)
    free = allocate([curves[u] for u in units], total_keep, min_keep)
    assert report["shard_keep_free"] == np.bincount(unit_attr(graph, "shard"), weights=free).astype(int).tolist()
    assert report["relaxed_loss_balanced"] >= report["relaxed_loss_free"] - 1e-9
    assert report["constraint_cost"] >= -1e-9


@SETTINGS
@given(sharded_problem(shard_counts=(2,)))
def test_balanced_allocation_is_optimal_within_its_window(case):
    """Against brute force: best split of total_keep over shards inside the window, each shard exact."""
    graph, curves, total_keep, min_keep, tolerance = case
    solved = _solve_or_skip(graph, curves, total_keep, min_keep, tolerance)
    if solved is None:
        return
    _, report = solved
    lo, hi = report["shard_keep_window"]
    shard_curves = [[curves[allocation_units(graph)[i]] for i in g] for g in unit_groups(graph, "shard")]
    best = np.inf
    for first in range(lo, hi + 1):
        split = (first, total_keep - first)
        if not lo <= split[1] <= hi:
            continue
        try:
            best = min(best, sum(exact_relaxed(c, s, min_keep)[1] for c, s in zip(shard_curves, split, strict=True)))
        except ValueError:
            continue
    assert report["relaxed_loss_balanced"] == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_loose_tolerance_changes_nothing_and_single_shard_is_free():
    graph = build_head_graph(num_layers=2, num_kv_heads=2, num_q_heads=2, shards=2)
    rng = np.random.default_rng(0)
    curves = {u: np.concatenate([[0.0], np.cumsum(rng.random(20))]) for u in allocation_units(graph)}
    free = allocate(list(curves.values()), 40, 1)
    keep, report = allocate_balanced(graph, curves, 40, 1, tolerance=2.0)
    assert list(keep.values()) == free.tolist()
    assert report["constraint_cost"] == 0
    keep, _ = allocate_balanced(build_head_graph(2, 2, 2), curves, 40, 1, tolerance=0.0)
    assert list(keep.values()) == free.tolist()


def test_tight_balance_is_paid_for():
    # Shard 0 holds the cheap head, shard 1 the expensive one; balance forces expensive keeps off.
    graph = build_head_graph(num_layers=1, num_kv_heads=2, num_q_heads=2, shards=2)
    curves = {("kv", 0, 0): np.arange(11.0), ("kv", 0, 1): 100 * np.arange(11.0)}
    keep, report = allocate_balanced(graph, curves, 10, 0, tolerance=0.0)
    assert keep == {("kv", 0, 0): 5, ("kv", 0, 1): 5}
    assert report["relaxed_loss_free"] == 10 and report["relaxed_loss_balanced"] == 5 + 500
    assert report["constraint_cost"] == 495


def test_balanced_errors():
    graph = build_head_graph(num_layers=1, num_kv_heads=2, num_q_heads=2, shards=2)
    curves = {("kv", 0, 0): np.arange(4.0), ("kv", 0, 1): np.arange(11.0)}
    with pytest.raises(ValueError, match="no balanced allocation for total_keep=12"):
        allocate_balanced(graph, curves, 12, 0, tolerance=0.0)
    with pytest.raises(ValueError, match=r"missing \[\('kv', 0, 1\)\]"):
        allocate_balanced(graph, {("kv", 0, 0): np.arange(4.0)}, 2, 0)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        allocate_balanced(graph, curves, 6, 0, tolerance=-0.1)
    with pytest.raises(ValueError, match=r"total_keep=20 .*sum\(T\)=13"):
        allocate_balanced(graph, curves, 20, 0)


@SETTINGS
@given(sharded_problem(shard_counts=(2, 3)))
def test_balanced_sweep_is_allocate_balanced_at_every_ratio(case):
    graph, curves, _, min_keep, tolerance = case
    units = allocation_units(graph)
    sizes = np.array([curves[u].size - 1 for u in units])
    ratios = np.array([0.0, 0.3, 0.7, 1.0])
    try:
        pruned = sweep_balanced(graph, [curves[u] for u in units], min_keep, ratios, tolerance)
    except ValueError as err:
        assert "no balanced allocation" in str(err)
        return
    for row, rho in zip(pruned, ratios, strict=True):
        target = max(int(np.floor((1 - rho) * sizes.sum() + 0.5)), min_keep * len(units))
        keep, _ = allocate_balanced(graph, curves, target, min_keep, tolerance)
        np.testing.assert_allclose(row, 1 - np.array([keep[u] for u in units]) / sizes)
