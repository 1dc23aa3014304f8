"""One eviction step for one layer: score -> budgets -> select -> rebuild the storage at the kept tokens.

Runs inside the `lukv::attend` op when the cache's settings call for it (cache.RaggedLayer.due_budget).
The candidates are given right-aligned as [B, H, T] (a prompt with left padding, or `RaggedStore.dense()`),
so the same step serves the prompt, a new turn, a prefill chunk and a long decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lukv_compile.policy import scorers
from lukv_compile.policy.budgets import adaptive_keep
from lukv_compile.policy.scorers import Rope, snapkv
from lukv_compile.policy.selection import protect_and_mask, select_tokens


class Storage(Protocol):
    """What eviction needs of a layer's storage (runtime/storage.py's RaggedStore)."""

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def replace(self, selected: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> None: ...


EVICT_RANGE = "lukv::evict"  # torch.profiler's name for one layer's scoring + selection + compaction


def real_queries(counts: np.ndarray, chunk: int, device: torch.device) -> torch.Tensor:
    """[B, C] bool: the chunk's real tokens, row b's last counts[b] (the padding is on the left)."""
    return torch.as_tensor(np.arange(chunk)[None, :] >= (chunk - counts)[:, None], device=device)


@dataclass(frozen=True)
class Candidates:
    """Tokens a layer may keep, right-aligned per head: keys/values [B, H, T, D], positions/valid [B, H, T]."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_chunk(cls, k: torch.Tensor, v: torch.Tensor, counts: np.ndarray, first_position: int) -> Candidates:
        """A chunk [B, H, C, D] whose row b has its counts[b] real tokens at the end (left padding)."""
        b, h, c, _ = k.shape
        real = real_queries(counts, c, k.device)
        positions = torch.arange(first_position, first_position + c, device=k.device).expand(b, h, c)
        return cls(k, v, positions, real[:, None, :].expand(b, h, c))

    @classmethod
    def from_store(cls, store: Storage) -> Candidates:
        return cls(*store.dense())


def score_candidates(scorer: str, q: torch.Tensor, cand: Candidates, scale: float, rope: Rope | None = None,
                     queries: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [B, H, T] of `scorer` (the GPU swaps in Triton SnapKV where the layout allows).

    rope: the layer's RoPE (scorers that need it); queries [B, C]: the chunk's real queries (None: all).
    """
    t = cand.keys.shape[2]
    prompt = q.shape[2] == t  # the Triton kernel takes its window queries from the keys' end
    if q.is_cuda and scorer == "snapkv" and prompt and bool((cand.valid == cand.valid[:, :1]).all()):
        from lukv_compile.kernels.triton_snapkv import triton_window_attention_mean

        window = min(snapkv.WINDOW, t)
        per_token = triton_window_attention_mean(q, cand.keys, cand.valid[:, 0], scale, window)
        return snapkv.from_window_mean(per_token, window, cand.keys.shape[1])
    return scorers.score(scorer, q, cand.keys, cand.values, cand.valid, scale, rope=rope, queries=queries)


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, *, sink: int, window: int,
              adaptive: bool) -> torch.Tensor:
    """[B, H, T] bool: each head's top-budget[b, h] tokens by `scores` (AdaKV: the row's total, split by score).

    The first `sink` and last `window` tokens of each head are always kept; a head never keeps more
    than it has. The evaluation's simulated engine selects with this too, so it keeps what the cache keeps.
    """
    scores = protect_and_mask(scores, valid, sink, window)
    keep = adaptive_keep(scores, budget.sum(dim=-1)) if adaptive else budget
    return select_tokens(scores, torch.minimum(keep, valid.sum(dim=-1)))


def evict(store: Storage, cand: Candidates, q: torch.Tensor, budget: np.ndarray, *, scorer: str, sink: int,
          window: int, adaptive: bool, scale: float, rope: Rope | None = None,
          queries: torch.Tensor | None = None) -> None:
    """Keep each head's top-budget[b, h] candidates in `store` (see `keep_mask`).

    The work is one `EVICT_RANGE` range in a torch.profiler trace (`lukv bench` times it from there).
    """
    with torch.profiler.record_function(EVICT_RANGE):
        scores = score_candidates(scorer, q, cand, scale, rope, queries)
        kept = keep_mask(scores, cand.valid, torch.as_tensor(budget, device=scores.device), sink=sink,
                         window=window, adaptive=adaptive)
        store.replace(kept, cand.keys, cand.values, cand.positions)
