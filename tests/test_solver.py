"""Tests for the LU-KV budget solver: hull, greedy allocation, sweep, exact references."""

import heapq
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lukv_compile.solver import (
    allocate,
    convex_minorant,
    exact_original,
    exact_relaxed,
    plan_evictions,
    sweep,
)

SETTINGS = settings(max_examples=50, deadline=None)


def curve_from_costs(costs) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])


@st.composite
def int_curves(draw, max_heads=5, max_tokens=10):
    """Curves with small integer costs: ties everywhere, exact float arithmetic."""
    n_heads = draw(st.integers(1, max_heads))
    costs = [draw(st.lists(st.integers(0, 20), min_size=1, max_size=max_tokens)) for _ in range(n_heads)]
    return [curve_from_costs(c) for c in costs]


@st.composite
def float_curves(draw, max_heads=5, max_tokens=10):
    n_heads = draw(st.integers(1, max_heads))
    cost = st.floats(0, 100, allow_nan=False, allow_infinity=False)
    return [curve_from_costs(draw(st.lists(cost, min_size=1, max_size=max_tokens))) for _ in range(n_heads)]


@st.composite
def budget(draw, curves):
    sizes = np.array([c.size - 1 for c in curves])
    min_keep = np.array([draw(st.integers(0, int(t))) for t in sizes])
    total_keep = draw(st.integers(int(min_keep.sum()), int(sizes.sum())))
    return total_keep, min_keep


@st.composite
def problem(draw, curves_strategy):
    curves = draw(curves_strategy)
    total_keep, min_keep = draw(budget(curves))
    return curves, total_keep, min_keep


def fraction_hull(values) -> list[Fraction]:
    """Reference lower hull with exact rational arithmetic, evaluated at every k."""
    ys = [Fraction(v) for v in values]
    stack = [0]
    for k in range(1, len(ys)):
        while len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            if (ys[b] - ys[a]) / (b - a) >= (ys[k] - ys[b]) / (k - b):
                stack.pop()
            else:
                break
        stack.append(k)
    hull = []
    for a, b in zip(stack, stack[1:], strict=False):
        slope = (ys[b] - ys[a]) / (b - a)
        hull.extend(ys[a] + slope * (k - a) for k in range(a, b))
    hull.append(ys[-1])
    return hull


def heap_greedy(curves, total_keep, min_keep) -> np.ndarray:
    """The paper's literal greedy: min-heap of next hull marginal cost, ties by head index."""
    marginals = [np.diff(np.array(fraction_hull(c), dtype=object)) for c in curves]
    keep = np.array([c.size - 1 for c in curves])
    min_keep = np.broadcast_to(min_keep, keep.shape)
    heap = [(marginals[h][0], h) for h in range(len(curves)) if keep[h] > min_keep[h]]
    heapq.heapify(heap)
    while keep.sum() > total_keep:
        _, h = heapq.heappop(heap)
        keep[h] -= 1
        if keep[h] > min_keep[h]:
            evicted = curves[h].size - 1 - keep[h]
            heapq.heappush(heap, (marginals[h][evicted], h))
    return keep


def hull_loss(curves, keep) -> float:
    return float(sum(convex_minorant(c)[c.size - 1 - k] for c, k in zip(curves, keep, strict=True)))


# --- hull ---------------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.integers(-30, 30), min_size=1, max_size=30))
def test_hull_matches_exact_rational_hull(values):
    hull = convex_minorant(np.array(values, dtype=np.float64))
    expected = fraction_hull(values)
    np.testing.assert_allclose(hull, [float(v) for v in expected], rtol=0, atol=1e-9)
    # Where the exact hull touches the curve (its vertices), ours equals the curve exactly.
    touches = [k for k, (v, e) in enumerate(zip(values, expected, strict=True)) if v == e]
    assert np.array_equal(hull[touches], np.array(values, dtype=np.float64)[touches])


@SETTINGS
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40))
def test_hull_is_convex_and_below_curve(values):
    curve = np.array(values)
    hull = convex_minorant(curve)
    scale = 1e-9 * (1 + np.abs(curve).max())
    assert np.all(hull <= curve + scale)
    assert np.all(np.diff(hull, 2) >= -scale)
    assert hull[0] == curve[0] and hull[-1] == curve[-1]


def test_hull_of_convex_curve_is_the_curve():
    curve = curve_from_costs(np.sort(np.random.default_rng(0).random(50)))
    np.testing.assert_allclose(convex_minorant(curve), curve, rtol=0, atol=1e-12)


def test_hull_bridges_a_barely_concave_curve():
    # Slopes fall by 1e-10 per token: every interior point is a (tiny) reflex vertex.
    curve = curve_from_costs(1 - 1e-10 * np.arange(100))
    hull = convex_minorant(curve)
    np.testing.assert_allclose(hull, curve[-1] * np.arange(101) / 100, rtol=0, atol=1e-12)
    assert np.all(hull[1:-1] < curve[1:-1])


def test_hull_known_example():
    # Points (0,0) (1,5) (2,1) (3,3): the spike at k=1 is bridged by the chord 0 -> 2.
    np.testing.assert_array_equal(convex_minorant(np.array([0.0, 5.0, 1.0, 3.0])), [0.0, 0.5, 1.0, 3.0])


# --- allocate -----------------------------------------------------------------------------------


@SETTINGS
@given(problem(int_curves()))
def test_allocate_equals_literal_heap_greedy(case):
    curves, total_keep, min_keep = case
    np.testing.assert_array_equal(allocate(curves, total_keep, min_keep), heap_greedy(curves, total_keep, min_keep))


@SETTINGS
@given(problem(float_curves()))
def test_allocate_respects_budget_and_floors(case):
    curves, total_keep, min_keep = case
    keep = allocate(curves, total_keep, min_keep)
    assert keep.sum() == total_keep
    assert np.all(keep >= min_keep)
    assert np.all(keep <= [c.size - 1 for c in curves])


@SETTINGS
@given(problem(float_curves()))
def test_greedy_is_optimal_for_relaxed_problem(case):
    curves, total_keep, min_keep = case
    keep = allocate(curves, total_keep, min_keep)
    exact_keep, exact_loss = exact_relaxed(curves, total_keep, min_keep)
    assert exact_keep.sum() == total_keep
    assert hull_loss(curves, keep) == pytest.approx(exact_loss, rel=1e-9, abs=1e-9)
    assert plan_evictions(curves, min_keep).relaxed_loss(keep) == pytest.approx(exact_loss, rel=1e-9, abs=1e-9)


@SETTINGS
@given(problem(float_curves()))
def test_relaxed_bounds_original(case):
    curves, total_keep, min_keep = case
    greedy_loss = plan_evictions(curves, min_keep).original_loss(allocate(curves, total_keep, min_keep))
    _, relaxed = exact_relaxed(curves, total_keep, min_keep)
    _, original = exact_original(curves, total_keep, min_keep)
    assert relaxed <= original + 1e-9 * (1 + abs(original))
    assert original <= greedy_loss + 1e-9 * (1 + abs(greedy_loss))


@st.composite
def convex_problem(draw):
    n_heads = draw(st.integers(1, 5))
    seeds = draw(st.lists(st.integers(1, 10), min_size=n_heads, max_size=n_heads))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    curves = [curve_from_costs(np.sort(rng.random(t) * 10)) for t in seeds]
    total_keep, min_keep = draw(budget(curves))
    return curves, total_keep, min_keep


@SETTINGS
@given(convex_problem())
def test_greedy_is_optimal_on_convex_curves(case):
    curves, total_keep, min_keep = case
    keep = allocate(curves, total_keep, min_keep)
    _, loss = exact_original(curves, total_keep, min_keep)
    greedy_loss = plan_evictions(curves, min_keep).original_loss(keep)
    assert greedy_loss == pytest.approx(loss, rel=1e-9, abs=1e-9)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**32 - 1), st.data())
def test_relabelling_heads_permutes_keeps(n_heads, tokens, seed, data):
    rng = np.random.default_rng(seed)
    curves = [curve_from_costs(rng.random(rng.integers(1, tokens + 1))) for _ in range(n_heads)]
    total_keep, min_keep = data.draw(budget(curves))
    perm = rng.permutation(n_heads)
    keep = allocate(curves, total_keep, min_keep)
    permuted = allocate([curves[p] for p in perm], total_keep, min_keep[perm])
    np.testing.assert_array_equal(permuted, keep[perm])


@SETTINGS
@given(problem(int_curves(max_heads=6)), st.data())
def test_groups_allocate_each_group_alone(case, data):
    curves, _, min_keep = case
    labels = np.array(data.draw(st.lists(st.integers(0, 2), min_size=len(curves), max_size=len(curves))))
    groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    sizes = np.array([c.size - 1 for c in curves])
    targets = [data.draw(st.integers(int(min_keep[g].sum()), int(sizes[g].sum()))) for g in groups]
    keep = allocate(curves, targets, min_keep, groups=groups)
    for g, target in zip(groups, targets, strict=True):
        np.testing.assert_array_equal(keep[g], allocate([curves[h] for h in g], target, min_keep[g]))


def test_two_dimensional_input_equals_list_input():
    curves = np.stack([curve_from_costs(np.random.default_rng(s).random(16)) for s in range(4)])
    np.testing.assert_array_equal(allocate(curves, 30, 2), allocate(list(curves), 30, 2))
    np.testing.assert_array_equal(sweep(curves, 2), sweep(list(curves), 2))


def test_allocate_known_example():
    # Head 0 costs 1, 2, 3 per token; head 1 costs 1.5, 1.5. Evicting 3: 1 (h0), 1.5 (h1), 1.5 (h1).
    curves = [curve_from_costs([1, 2, 3]), curve_from_costs([1.5, 1.5])]
    np.testing.assert_array_equal(allocate(curves, 2, 0), [2, 0])
    # Equal costs go to the lower head index first.
    np.testing.assert_array_equal(allocate([curve_from_costs([1]), curve_from_costs([1])], 1, 0), [0, 1])


# --- sweep --------------------------------------------------------------------------------------


@st.composite
def layered_problem(draw):
    n_layers, per_layer = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    curves = [curve_from_costs(rng.random(rng.integers(1, 12)) ** 3) for _ in range(n_layers * per_layer)]
    _, min_keep = draw(budget(curves))
    return curves, min_keep, np.repeat(np.arange(n_layers), per_layer)


@SETTINGS
@given(layered_problem(), st.sampled_from(["global", "layer"]))
def test_sweep_solutions_are_nested(case, scope):
    curves, min_keep, layers = case
    sizes = np.array([c.size - 1 for c in curves])
    ratios = np.linspace(0, 1, 21)
    prune = sweep(curves, min_keep, ratios, scope=scope, layer_of_head=layers if scope == "layer" else None)
    keep = np.rint((1 - prune) * sizes).astype(int)
    assert prune.shape == (ratios.size, len(curves))
    assert np.all(np.diff(keep, axis=0) <= 0)
    assert np.all(keep >= min_keep)
    groups = [np.arange(len(curves))] if scope == "global" else [layers == g for g in np.unique(layers)]
    for i, rho in enumerate(ratios):
        for g in groups:
            target = int(np.floor((1 - rho) * sizes[g].sum() + 0.5))
            assert keep[i, g].sum() == min(max(target, min_keep[g].sum()), sizes[g].sum())
            if scope == "global":
                np.testing.assert_array_equal(keep[i], allocate(curves, keep[i].sum(), min_keep))


def test_sweep_layer_scope_keeps_each_layer_at_the_ratio():
    rng = np.random.default_rng(3)
    curves = np.stack([curve_from_costs(rng.random(100) * scale) for scale in (1, 1, 100, 100)])
    prune = sweep(curves, 0, [0.5], scope="layer", layer_of_head=[0, 0, 1, 1])
    assert prune[0, :2].sum() == pytest.approx(1.0) and prune[0, 2:].sum() == pytest.approx(1.0)
    # Globally the cheap layer absorbs all the evictions.
    np.testing.assert_allclose(sweep(curves, 0, [0.5])[0], [1, 1, 0, 0])


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_bad_values():
    curves = [curve_from_costs([1, 2, 3]), curve_from_costs([1, 2])]
    with pytest.raises(ValueError, match=r"total_keep=1 .*sum\(min_keep\)=2"):
        allocate(curves, 1, 1)
    with pytest.raises(ValueError, match=r"total_keep=6 .*sum\(T\)=5"):
        allocate(curves, 6, 0)
    with pytest.raises(ValueError, match=r"head 1: min_keep=3 outside allowed range 0..T=2"):
        allocate(curves, 4, 3)
    with pytest.raises(ValueError, match="min_keep must be integers"):
        allocate(curves, 4, 1.5)
    with pytest.raises(ValueError, match="total_keep must be an integer"):
        allocate(curves, 4.0, 1)
    with pytest.raises(ValueError, match="non-finite"):
        allocate([np.array([0.0, np.nan])], 1, 0)
    with pytest.raises(ValueError, match="must be 2-D"):
        allocate(np.arange(4.0), 1, 0)
    with pytest.raises(ValueError, match="length >= 2"):
        allocate([np.array([0.0])], 0, 0)
    with pytest.raises(ValueError, match="head 1 appears 2 times"):
        allocate(curves, [2, 2], 0, groups=[[0, 1], [1]])
    with pytest.raises(ValueError, match="2 entries but there are 1 groups"):
        allocate(curves, [2, 2], 0, groups=[[0, 1]])
    with pytest.raises(ValueError, match=r"total_keep=3 \(group 1\)"):
        allocate(curves, [1, 3], 0, groups=[[0], [1]])
    with pytest.raises(ValueError, match=r"ratios must lie in \[0, 1\]"):
        sweep(curves, 0, [0.5, 1.5])
    with pytest.raises(ValueError, match="scope must be"):
        sweep(curves, 0, scope="head")
    with pytest.raises(ValueError, match="layer_of_head is required"):
        sweep(curves, 0, scope="layer")
    with pytest.raises(ValueError, match="one per head"):
        sweep(curves, 0, scope="layer", layer_of_head=[0])
