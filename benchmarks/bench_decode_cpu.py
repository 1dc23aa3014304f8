"""CPU decode attention: the ragged-cache reference vs full-cache SDPA, SmolLM2-135M shapes.

One layer, one decode step: 9 query heads, 3 KV heads, head_dim 64, fp32, batch 1, 8k context.
Compression 0.8 with a non-uniform per-head budget (keep fractions drawn with mean 0.2), plus `room`
free decode slots per head. Timings are medians over interleaved repeats on one thread.
Prints JSON; ratio = sdpa_time / ours (SDPA with enable_gqa, as HF decodes).

    python benchmarks/bench_decode_cpu.py [--context 8192] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lukv_compile.kernels import reference

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def keep_fractions(heads: int, mean: float, seed: int) -> torch.Tensor:
    """Per-head keep fractions with the given mean: Dirichlet shares of the layer's total, capped at 1."""
    gen = torch.Generator().manual_seed(seed)
    shares = torch._standard_gamma(torch.full((heads,), 2.0), generator=gen)
    fractions = (shares / shares.sum() * mean * heads).clamp(max=1.0)
    return fractions * (mean * heads / fractions.sum())  # the cap moved a little mass: restore the mean


def ragged_layer(context: int, fractions: torch.Tensor, room: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = (fractions * context).round().long().view(1, -1)
    cap = (lengths + room).flatten()
    slots = int(cap.sum())
    return dict(keys=torch.randn(slots, HEAD_DIM, generator=gen), values=torch.randn(slots, HEAD_DIM, generator=gen),
                seg_start=(cap.cumsum(0) - cap).view(1, -1), seg_len=lengths.int())


def median_times(candidates: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved so drift hits them all alike."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--compression", type=float, default=0.8)
    parser.add_argument("--room", type=int, default=64, help="free decode slots per head (max_new_tokens)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.compression < 1.0:
        parser.error(f"--compression must be in [0, 1), got {args.compression}")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    fractions = keep_fractions(KV_HEADS, 1.0 - args.compression, args.seed)
    layer = ragged_layer(args.context, fractions, args.room, args.seed)
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
    k_full = torch.randn(1, KV_HEADS, args.context, HEAD_DIM, generator=gen)
    v_full = torch.randn(1, KV_HEADS, args.context, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    group = Q_HEADS // KV_HEADS
    ours = lambda: reference.decode_attention(q, layer["keys"], layer["values"],
                                              layer["seg_start"], layer["seg_len"], scale)
    by_slot = lambda: reference.decode_attention_by_slot(q, layer["keys"], layer["values"],
                                                         layer["seg_start"], layer["seg_len"], scale)
    sdpa_gqa = lambda: F.scaled_dot_product_attention(q, k_full, v_full, scale=scale, enable_gqa=True)
    sdpa_repeat_kv = lambda: F.scaled_dot_product_attention(
        q, k_full.repeat_interleave(group, dim=1), v_full.repeat_interleave(group, dim=1), scale=scale)
    # Pairs, each interleaved on its own: a baseline's cache and allocator churn (repeat_kv copies 2 x 28 MB
    # per call) then lands on the candidate it is compared with, as it would between layers of a model.
    pairs = {"ours_vs_sdpa_gqa": (ours, sdpa_gqa), "ours_vs_sdpa_repeat_kv": (ours, sdpa_repeat_kv),
             "by_slot_vs_sdpa_gqa": (by_slot, sdpa_gqa)}
    results = {}
    for name, (candidate, baseline) in pairs.items():
        times = median_times({"candidate": candidate, "baseline": baseline}, args.repeats)
        results[name] = {"candidate_ms": round(times["candidate"] * 1e3, 4),
                         "baseline_ms": round(times["baseline"] * 1e3, 4),
                         "ratio": round(times["baseline"] / times["candidate"], 3)}
    print(json.dumps({
        "shape": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, batch=1, dtype="float32",
                      context=args.context, compression=args.compression, room=args.room),
        "keep_fractions": [round(f, 4) for f in fractions.tolist()],
        "slots": layer["keys"].shape[0],
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ratio": results["ours_vs_sdpa_gqa"]["ratio"],
        "pairs": results,
    }, indent=2))


if __name__ == "__main__":
    main()
