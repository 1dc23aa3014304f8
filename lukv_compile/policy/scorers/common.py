"""The contract every scorer keeps, and the helpers several of them share.

A scorer maps a chunk's post-RoPE queries and the candidate keys/values to scores `[B, H_kv, T]`
float32 at KV-head granularity (higher = keep). Keys come per KV head, right-aligned: `valid` [B, H_kv, T]
is False where a head has no token (left padding of a prompt, or a head holding fewer tokens than the
longest). The queries [B, Hq, C, D] are the chunk's; its real ones (`queries` [B, C]) are its last ones and
line up with each head's last key positions. Protected tokens (sink, window) are handled by the selection
step, not here; scorers only use `valid` to keep empty slots out of their statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rope:
    """What a scorer needs of a layer's rotary embedding: inv_freq [D/2] float32, rotate_half convention.

    RoPE's attention_scaling (YaRN, LongRoPE) is left out: it scales queries, keys and rotations alike,
    and no scorer's ranking depends on it (see expected_attention.py).
    """

    inv_freq: torch.Tensor

    @classmethod
    def from_theta(cls, dim: int, theta: float) -> Rope:
        """Plain RoPE over `dim` dimensions with base `theta` (transformers' "default" rope type)."""
        return cls(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@dataclass(frozen=True)
class ScoreInputs:
    """One scoring call: q [B, Hq, C, D], k/v [B, H_kv, T, D], valid [B, H_kv, T], queries [B, C] bool.

    scale None: 1/sqrt(D); queries None: every query of the chunk is real.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    scale: float | None = None
    rope: Rope | None = None
    queries: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale is None:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.q.shape[-1]))
        if self.queries is None:
            b, _, c, _ = self.q.shape
            object.__setattr__(self, "queries", torch.ones(b, c, dtype=torch.bool, device=self.q.device))


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: its name, its function, the protected recent window it defaults to, and whether it
    needs the model's RoPE."""

    name: str
    fn: Callable[[ScoreInputs], torch.Tensor]
    window: int
    needs_rope: bool = False  # reads ScoreInputs.rope: a cache must know the model's RoPE frequencies


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, H_kv, ...]: mean over the query heads of each GQA group."""
    b, hq = x.shape[:2]
    return x.view(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(dim=2)


def per_query_head(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """[B, H_kv, ...] -> [B, Hq, ...]: every query head of a GQA group gets its KV head's entry."""
    return x.repeat_interleave(q_heads // x.shape[1], dim=1)


def window_queries(q: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window` queries of the chunk [B, Hq, C, D] (fewer when the chunk is shorter)."""
    return q[:, :, -min(window, q.shape[2]):, :]
