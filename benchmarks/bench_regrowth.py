"""Cost of laying a layer out again when a head runs out of room (`RaggedStore._move`), per layout copy.

A decode step pays one such copy per layer whenever a head of that layer is full (every ~16 steps while
any head holds < 256 tokens). Compares the shipped copy (one slice per head) with the gather/scatter over
every held slot's index that it replaced, on a few layer shapes; one thread, best-of-3 means of 50 calls.

    python benchmarks/bench_regrowth.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lukv_compile.runtime.storage import RaggedStore, segment_slots, starts_of

SHAPES = {  # (batch, KV heads): tokens held per head of one row
    "SmolLM2 4k, batch 1": (1, [83, 1500, 875]),
    "SmolLM2 8k, batch 1": (1, [300, 3000, 3200]),
    "8 KV heads, batch 8": (8, [200, 900, 400, 1200, 300, 800, 100, 1600]),
    "8 KV heads, batch 32": (32, [200, 900, 400, 1200, 300, 800, 100, 1600]),
}


def filled_store(batch: int, lengths: list[int], head_dim: int = 64) -> RaggedStore:
    store = RaggedStore(batch, len(lengths), head_dim, torch.float32, torch.device("cpu"))
    store.length = np.tile(np.array(lengths, dtype=np.int64), (batch, 1))
    store.cap = store.length + 16
    store.start = starts_of(store.cap)
    slots = int(store.cap.sum())
    store.keys, store.values = torch.randn(slots, head_dim), torch.randn(slots, head_dim)
    store.positions = torch.arange(slots, dtype=torch.int32)
    return store


def gather_scatter_move(store: RaggedStore, cap: np.ndarray) -> None:
    """The replaced copy: every held slot's source and destination index, one gather + scatter per tensor."""
    start = starts_of(cap)
    total = int(cap.sum())
    src = torch.as_tensor(segment_slots(store.start, store.length))
    dst = torch.as_tensor(segment_slots(start, store.length))
    keys = store.keys.new_zeros(total, store.head_dim)
    values = store.values.new_zeros(total, store.head_dim)
    positions = store.positions.new_full((total,), -1)
    keys[dst], values[dst], positions[dst] = store.keys[src], store.values[src], store.positions[src]


def mean_us(fn, *args, calls: int = 50) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def shipped_move(store: RaggedStore, cap: np.ndarray) -> None:
    store._move(store.start, store.length, cap)  # the same work on every call: all tokens into a fresh layout


def main() -> None:
    torch.set_num_threads(1)
    print("| layer | tokens | slice per head (us) | gather/scatter (us) | speed-up |\n|---|---:|---:|---:|---:|")
    for name, (batch, lengths) in SHAPES.items():
        store = filled_store(batch, lengths)
        cap = store.length + 32
        old = mean_us(gather_scatter_move, store, cap)
        shipped = mean_us(shipped_move, store, cap)
        print(f"| {name} | {store.num_tokens} | {shipped:.0f} | {old:.0f} | {old / shipped:.1f}x |")


if __name__ == "__main__":
    main()
