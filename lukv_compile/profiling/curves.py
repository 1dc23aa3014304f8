"""Per-head loss curves: the oracle utility a scorer throws away when it evicts k tokens of a head.

Scores come from `lukv_compile.policy.scorers.score` on the context prefill, exactly as inference computes
them. Protected tokens (first `sink`, last `window`) are never evicted, so they are left out. The
rest are ranked like the runtime selection ranks them (descending, stable: ties keep the earlier
token), and the head evicts from the bottom of that order: cum_loss[k] = sum of I over the k
lowest-ranked tokens, cum_loss[0] = 0.
"""

from __future__ import annotations

import numpy as np
import torch

from lukv_compile.policy import scorers
from lukv_compile.policy.scorers import Rope
from lukv_compile.policy.selection import protect_and_mask


def check_protection(context_len: int, sink: int, window: int) -> int:
    """Number of evictable tokens per head; refuses contexts that protection would cover entirely."""
    if sink < 0 or window < 0:
        raise ValueError(f"sink and window must be >= 0, got sink={sink} window={window}")
    if context_len <= sink + window:
        raise ValueError(f"context of {context_len} tokens leaves nothing to evict with sink={sink} + window={window}")
    return context_len - sink - window


def layer_scores(scorer: str, q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor],
                 scaling: list[float], ropes: list[Rope | None] | None = None) -> torch.Tensor:
    """Scores [L, H_kv, T] of `scorer` for every layer of one unpadded prefill (q/k/v [1, H, T, D] per layer).

    ropes: each layer's RoPE (`scorers.layer_ropes(model.config)`), needed by expected_attention.
    """
    valid = torch.ones(k[0].shape[:3], dtype=torch.bool, device=k[0].device)
    ropes = [None] * len(k) if ropes is None else ropes
    return torch.stack([scorers.score(scorer, ql, kl, vl, valid, s, rope=r)[0]
                        for ql, kl, vl, s, r in zip(q, k, v, scaling, ropes, strict=True)])


def eviction_order(scores: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """[heads, T - sink - window] unprotected token indices per head, first-evicted (lowest-ranked) first.

    scores [..., T] for one unpadded context; leading dims are flattened into heads.
    """
    t = scores.shape[-1]
    evictable = check_protection(t, sink, window)
    flat = scores.reshape(1, -1, t)
    ranked = protect_and_mask(flat, torch.ones_like(flat, dtype=torch.bool), sink, window)[0]
    # The runtime keeps a stable descending top-k (select_tokens); its tail is what gets evicted.
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    return order[:, -evictable:].flip(-1).cpu()


def cum_losses(importance: torch.Tensor, order: torch.Tensor) -> np.ndarray:
    """[heads, E + 1] float64 curves: cum_loss[h, k] = sum of I over head h's first k evicted tokens."""
    flat = importance.reshape(order.shape[0], -1).double().cpu()
    lost = flat.gather(-1, order)
    return torch.cat([torch.zeros(order.shape[0], 1, dtype=torch.float64), lost.cumsum(-1)], dim=-1).numpy()

