"""Greatest convex minorant (lower convex hull) of per-head cumulative-loss curves.

A head's curve holds points (k, cum_loss[k]) for k = 0..T, k = tokens evicted. LU-KV replaces it by
its lower convex hull so that per-token eviction costs (the hull slopes) are non-decreasing; every
token inside one hull segment costs that segment's slope.

`hull_segments` runs Andrew's monotone chain on all heads at once: one numpy step per token
position, vectorised across heads, so a whole model (heads x T) costs O(T) numpy calls.
"""

from dataclasses import dataclass

import numpy as np

from .checks import as_curves


@dataclass(frozen=True)
class HullSegments:
    """Hull segments of several curves, flattened head-major (head, then left to right).

    Segment i of head `head[i]` spans tokens start[i]+1 .. end[i] (evictions start[i] -> end[i]),
    each costing slope[i]. A head's slopes strictly increase from left to right.
    """

    head: np.ndarray  # int64
    start: np.ndarray  # int64
    end: np.ndarray  # int64
    slope: np.ndarray  # float64


def hull_segments(curves: list[np.ndarray]) -> HullSegments:
    """Lower-hull segments of every curve, computed together (curves may differ in length)."""
    n_heads = len(curves)
    lengths = np.array([c.size for c in curves], dtype=np.int64)
    width = int(lengths.max())
    ys = np.zeros((n_heads, width), dtype=np.float64)
    for h, c in enumerate(curves):
        ys[h, : c.size] = c
    rows = np.arange(n_heads)

    # Per-head stack of hull vertices and the slope of the segment ending at each vertex.
    stack_x = np.zeros((n_heads, width), dtype=np.int64)
    stack_slope = np.zeros((n_heads, width), dtype=np.float64)
    top = np.ones(n_heads, dtype=np.int64)  # stack size; vertex 0 is always on the hull
    # The top vertex and its incoming slope are cached so the common no-pop step needs no gathers.
    top_x = np.zeros(n_heads, dtype=np.int64)
    top_y = ys[:, 0].copy()
    top_slope = np.full(n_heads, -np.inf)
    all_active = bool(np.all(lengths == width))

    for k in range(1, width):
        active = None if all_active else lengths > k
        y = ys[:, k]
        while True:
            new_slope = (y - top_y) / (k - top_x)
            # Pop the top vertex when it lies on or above the chord from its predecessor to k.
            pop = top_slope >= new_slope
            if active is not None:
                pop &= active
            popped = np.flatnonzero(pop)
            if popped.size == 0:
                break
            top[popped] -= 1
            t = top[popped] - 1
            top_x[popped] = stack_x[popped, t]
            top_y[popped] = ys[popped, top_x[popped]]
            top_slope[popped] = np.where(t > 0, stack_slope[popped, t], -np.inf)
        push = rows if active is None else np.flatnonzero(active)
        stack_x[push, top[push]] = k
        stack_slope[push, top[push]] = new_slope[push]
        top_x[push] = k
        top_y[push] = y[push]
        top_slope[push] = new_slope[push]
        top[push] += 1

    # Segment t of a head ends at stack vertex t (t >= 1) and starts at vertex t-1.
    cols = np.arange(width)
    is_end = (cols[None, :] >= 1) & (cols[None, :] < top[:, None])
    head_of = np.broadcast_to(rows[:, None], (n_heads, width))
    starts = np.concatenate([np.zeros((n_heads, 1), dtype=np.int64), stack_x[:, :-1]], axis=1)
    return HullSegments(
        head=head_of[is_end].astype(np.int64),
        start=starts[is_end],
        end=stack_x[is_end],
        slope=stack_slope[is_end],
    )


def convex_minorant(cum_loss: np.ndarray) -> np.ndarray:
    """Greatest convex minorant of the points (k, cum_loss[k]), k = 0..n, evaluated at every k.

    Equals cum_loss exactly at hull vertices; in between it is linear, so np.diff of the result is
    non-decreasing (up to float rounding of the interpolation).
    """
    curve = as_curves([cum_loss])[0]
    seg = hull_segments([curve])
    hull = np.empty_like(curve)
    hull[0] = curve[0]
    lengths = seg.end - seg.start
    start = np.repeat(seg.start, lengths)
    slope = np.repeat(seg.slope, lengths)
    k = np.arange(1, curve.size)
    hull[1:] = curve[start] + slope * (k - start)
    hull[seg.end] = curve[seg.end]
    return hull
