"""Input validation shared by the solvers: every bad input is rejected before any work starts."""

import operator

import numpy as np


def as_curves(cum_losses) -> list[np.ndarray]:
    """Validate curves given as a list of 1-D arrays or a 2-D array; return float64 1-D arrays."""
    if isinstance(cum_losses, np.ndarray) and cum_losses.ndim != 2:
        raise ValueError(f"cum_losses as an array must be 2-D [heads, T+1], got shape {cum_losses.shape}")
    curves = [np.asarray(c, dtype=np.float64) for c in cum_losses]
    if not curves:
        raise ValueError("cum_losses is empty: need at least one head")
    for h, c in enumerate(curves):
        if c.ndim != 1 or c.size < 1:
            raise ValueError(f"head {h}: curve must be a non-empty 1-D array, got shape {c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError(f"head {h}: curve has non-finite values (nan/inf)")
    return curves


def head_sizes(curves: list[np.ndarray]) -> np.ndarray:
    """Evictable tokens T_h per head (curve length T_h + 1); every head needs at least one."""
    sizes = np.array([c.size - 1 for c in curves], dtype=np.int64)
    empty = np.flatnonzero(sizes < 1)
    if empty.size:
        raise ValueError(f"head {empty[0]}: curve of length 1 has no evictable token; need length >= 2")
    return sizes


def as_min_keep(min_keep, sizes: np.ndarray) -> np.ndarray:
    """Broadcast min_keep (int or one per head) and check 0 <= min_keep_h <= T_h."""
    arr = np.asarray(min_keep)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.size != sizes.size):
        raise ValueError(f"min_keep must be an int or one entry per head ({sizes.size}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"min_keep must be integers, got dtype {arr.dtype}")
    arr = np.broadcast_to(arr, sizes.shape).astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr > sizes))
    if bad.size:
        h = bad[0]
        raise ValueError(f"head {h}: min_keep={arr[h]} outside allowed range 0..T={sizes[h]}")
    return arr


def as_count(value, name: str) -> int:
    """An exact integer (python or numpy int), else a ValueError naming the value."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_total_keep(total_keep: int, min_keep: np.ndarray, sizes: np.ndarray, where: str = "") -> None:
    """total_keep must lie in [sum(min_keep), sum(T)]."""
    lo, hi = int(min_keep.sum()), int(sizes.sum())
    if not lo <= total_keep <= hi:
        raise ValueError(
            f"total_keep={total_keep}{where} is infeasible: must be between sum(min_keep)={lo} "
            f"and the total evictable tokens sum(T)={hi}"
        )
