"""Token selection from scores: which tokens each head keeps, given how many.

Shared by the runtime eviction (eviction.py) and the offline profiler (profiling/curves.py), so a profile
ranks tokens exactly as inference keeps them. Scores and valid are [B, H, T], right-aligned per head.
"""

from __future__ import annotations

import torch


def protect_and_mask(scores: torch.Tensor, valid: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Empty slots -> -inf (never kept); each head's first `sink` and last `window` tokens -> +inf (always kept).

    scores and valid are [B, H, T]; a head's tokens are its valid entries, in sequence order.
    """
    rank = valid.long().cumsum(dim=-1) - 1
    count = valid.sum(dim=-1, keepdim=True)
    protected = valid & ((rank < sink) | (rank >= count - window))
    scores = scores.float().masked_fill(protected, float("inf"))
    return scores.masked_fill(~valid, float("-inf"))


def select_tokens(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, H, T] bool: each head's top-`keep[b, h]` tokens (stable: ties go to the earlier token)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    chosen = torch.arange(scores.shape[-1], device=scores.device) < keep[..., None]
    return torch.zeros_like(chosen).scatter_(-1, order, chosen)
