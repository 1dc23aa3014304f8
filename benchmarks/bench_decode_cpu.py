"""CPU decode attention: `segment_attention` over ragged per-head storage vs full-cache SDPA, SmolLM2-135M shapes.

One decode step's attention over all 30 layers: 9 query heads, 3 KV heads, head_dim 64, fp32, batch 1,
8k context. Each layer is a `RaggedStore` built as the cache builds it: the prompt's K/V appended, each
head evicted to its budget (at compression 0.8, ~20% kept overall, very unevenly over heads: by default
the shipped SmolLM2 LU-KV profile's per-head budgets), then the decode token appended. The baselines
attend the same query over the whole 8k cache: SDPA with enable_gqa (as HF decodes) and repeat_kv + SDPA
(the eager Llama path). One thread; the three are interleaved in every repeat (so drift hits them all
alike) and the medians reported. speedup = baseline time / segment_attention time.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_cpu.py [--context 8192] [--repeats 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lukv_compile.kernels.reference import segment_attention
from lukv_compile.policy.selection import select_tokens
from lukv_compile.runtime.storage import RaggedStore

Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
PROFILES = Path(__file__).resolve().parents[1] / "lukv_compile" / "profiles"
PROFILE = PROFILES / "smollm2-135m-instruct-window_expected_attention.safetensors"


def profile_budgets(context: int, compression: float) -> np.ndarray:
    """Keep counts [L, H] of the shipped SmolLM2 LU-KV profile (what the cache would keep)."""
    from lukv_compile.policy.budgets import keep_counts
    from lukv_compile.profile import Profile

    profile = Profile.load(PROFILE)
    return keep_counts(profile, compression, [context], profile.sink + profile.window)[0]


def dirichlet_budgets(context: int, compression: float, seed: int) -> np.ndarray:
    """Keep counts [L, H]: per layer, Dirichlet(2) shares of the layer's total, mean keep 1 - compression."""
    rng = np.random.default_rng(seed)
    shares = rng.gamma(2.0, size=(LAYERS, KV_HEADS))
    fractions = np.clip(shares / shares.sum(axis=1, keepdims=True) * (1 - compression) * KV_HEADS, 0, 1)
    return np.maximum(1, np.rint(fractions * context)).astype(np.int64)


def ragged_layer(context: int, keep: np.ndarray, gen: torch.Generator) -> RaggedStore:
    """A layer's store after the prompt's eviction to `keep` [H] tokens and one decode append."""
    store = RaggedStore(1, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 1, KV_HEADS, context, HEAD_DIM, generator=gen)
    store.append(k, v, np.array([context]), 0)
    keys, values, positions, _ = store.dense()
    scores = torch.rand(1, KV_HEADS, context, generator=gen)
    store.replace(select_tokens(scores, torch.as_tensor(keep)[None]), keys, values, positions)
    k_new, v_new = torch.randn(2, 1, KV_HEADS, 1, HEAD_DIM, generator=gen)
    store.append(k_new, v_new, np.array([1]), context)
    return store


def median_times(candidates: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved (order rotated each repeat)."""
    times = {name: [] for name in candidates}
    items = list(candidates.items())
    for _, fn in items:
        fn()  # warm-up
    for i in range(repeats):
        for name, fn in items[i % len(items):] + items[:i % len(items)]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def check_exact(store: RaggedStore, q: torch.Tensor, scale: float) -> float:
    """Max |segment_attention - SDPA over the head's kept tokens (dense, padding masked)|."""
    keys, values, _, valid = store.dense()
    group = Q_HEADS // KV_HEADS
    expected = F.scaled_dot_product_attention(q, keys.repeat_interleave(group, dim=1),
                                              values.repeat_interleave(group, dim=1),
                                              attn_mask=valid.repeat_interleave(group, dim=1)[:, :, None, :],
                                              scale=scale)
    out = segment_attention(q, store.keys, store.values, store.start, store.length, np.array([1]), scale)
    return float((out - expected).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--compression", type=float, default=0.8)
    parser.add_argument("--budgets", choices=("profile", "dirichlet"), default="profile",
                        help="per-head budgets: the shipped SmolLM2 LU-KV profile, or random Dirichlet shares")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.compression < 1.0:
        parser.error(f"--compression must be in [0, 1), got {args.compression}")
    torch.set_num_threads(1)
    budgets = (profile_budgets(args.context, args.compression) if args.budgets == "profile"
               else dirichlet_budgets(args.context, args.compression, args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    stores = [ragged_layer(args.context, budgets[layer], gen) for layer in range(LAYERS)]
    t = args.context + 1  # the full cache holds the prompt and the decode token
    full = [torch.randn(2, 1, KV_HEADS, t, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
    scale, one = HEAD_DIM**-0.5, np.array([1])
    group = Q_HEADS // KV_HEADS

    def ours():
        for s in stores:
            segment_attention(q, s.keys, s.values, s.start, s.length, one, scale)

    def sdpa_gqa():
        for k, v in full:
            F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def sdpa_repeat_kv():
        for k, v in full:
            F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                           scale=scale)

    max_err = max(check_exact(s, q, scale) for s in stores)
    times = median_times({"segment_attention": ours, "sdpa_gqa": sdpa_gqa, "repeat_kv_sdpa": sdpa_repeat_kv},
                         args.repeats)
    kept = np.stack([s.length[0] for s in stores])  # [L, H], the decode token included
    ragged_bytes = sum(s.nbytes() for s in stores)
    full_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in full)
    report = {
        "shape": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layers=LAYERS, batch=1, dtype="float32",
                      context=args.context, compression=args.compression, budgets=args.budgets),
        "kept_share": round(float(kept.sum() / (LAYERS * KV_HEADS * t)), 4),
        "kept_per_head": dict(min=int(kept.min()), median=int(np.median(kept)), max=int(kept.max())),
        "kv_bytes": dict(ragged=ragged_bytes, full=full_bytes, ratio=round(ragged_bytes / full_bytes, 4)),
        "max_abs_err_vs_dense_sdpa": max_err,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ms_per_step": {name: round(s * 1e3, 3) for name, s in times.items()},
        "speedup": {name: round(times[name] / times["segment_attention"], 2) for name in ("sdpa_gqa",
                                                                                           "repeat_kv_sdpa")},
    }
    print(f"decode attention, {LAYERS} layers x ({Q_HEADS}q/{KV_HEADS}kv heads, d={HEAD_DIM}), context "
          f"{args.context}, compression {args.compression} ({args.budgets} budgets, kept {report['kept_share']:.1%}, "
          f"per head {kept.min()}..{kept.max()}), {torch.get_num_threads()} thread, median of {args.repeats}")
    print(f"{'method':<22}{'ms/step':>10}{'ms/layer':>10}{'vs ours':>10}")
    for name, seconds in times.items():
        print(f"{name:<22}{seconds * 1e3:>10.3f}{seconds * 1e3 / LAYERS:>10.4f}"
              f"{seconds / times['segment_attention']:>9.2f}x")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
