"""Time the LU-KV budget sweep on a model-sized instance and print the numbers as JSON.

Synthetic curves shaped like real profiles: heavy-tailed token utilities, ranked by a noisy
scorer (so the curves are non-convex), one curve per (layer, KV head).
Usage: python benchmarks/bench_solver.py [--layers 32 --kv-heads 8 --tokens 8192 --repeats 3]
"""

import argparse
import json
import platform
import time

import numpy as np

from lukv_compile.solver import allocate, sweep
from lukv_compile.solver.hull import hull_segments


def synthetic_curves(n_heads: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    utility = rng.lognormal(sigma=2.0, size=(n_heads, tokens))
    noise = rng.uniform(0.3, 3.0, size=(n_heads, 1))  # scorer quality differs per head
    score = np.log(utility) + noise * rng.standard_normal((n_heads, tokens))
    ranked = np.take_along_axis(utility, np.argsort(score, axis=1), axis=1)
    return np.concatenate([np.zeros((n_heads, 1)), np.cumsum(ranked, axis=1)], axis=1)


def best_of(fn, repeats: int) -> dict[str, float]:
    """Best wall and CPU seconds over repeats (CPU time is the steadier number on a shared box)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_s": round(min(wall), 4), "cpu_s": round(min(cpu), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n_heads = args.layers * args.kv_heads
    curves = synthetic_curves(n_heads, args.tokens, args.seed)
    layer_of_head = np.repeat(np.arange(args.layers), args.kv_heads)
    min_keep = max(round(0.01 * args.tokens), 4 + 32)
    hull_time = best_of(lambda: hull_segments(list(curves)), args.repeats)
    result = {
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "tokens": args.tokens,
        "ratios": 99,
        "hull_vertices": int(hull_segments(list(curves)).head.size + n_heads),
        "hull": hull_time,
        "sweep_global": best_of(lambda: sweep(curves, min_keep), args.repeats),
        "sweep_layer": best_of(
            lambda: sweep(curves, min_keep, scope="layer", layer_of_head=layer_of_head), args.repeats
        ),
        "allocate": best_of(lambda: allocate(curves, n_heads * args.tokens // 5, min_keep), args.repeats),
        "repeats": args.repeats,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
