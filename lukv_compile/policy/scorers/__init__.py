"""Token scorers: which tokens a KV head keeps. One scorer per module, one contract (common.py).

The runtime eviction and the offline profiler both call `score()`, so a profile measures exactly what
runs. Scores are [B, H_kv, T] float32, higher = keep.

| name | module | what it is |
|---|---|---|
| `snapkv` | snapkv.py | SnapKV as published: window 32, max-pool 7 over the prefix |
| `keydiff` | keydiff.py | KeyDiff: keys unlike the mean key |
| `expected_attention` | expected_attention.py | Expected Attention as kvpress defines it (needs `rope`) |
| `window_expected_attention` | window_ea.py | the project's earlier variant: last 32 post-RoPE queries |
| `streaming` | streaming.py | StreamingLLM: the most recent tokens |
"""

from __future__ import annotations

import torch

from lukv_compile.policy.scorers import expected_attention, keydiff, snapkv, streaming, window_ea
from lukv_compile.policy.scorers.common import Rope, ScoreInputs, Scorer
from lukv_compile.policy.scorers.rope import layer_ropes

REGISTRY: dict[str, Scorer] = {s.name: s for s in (
    snapkv.SCORER, keydiff.SCORER, expected_attention.SCORER, window_ea.SCORER, streaming.SCORER)}
SCORERS = tuple(REGISTRY)
DEFAULT_WINDOW = {name: s.window for name, s in REGISTRY.items()}  # protected recent tokens per scorer

__all__ = ["DEFAULT_WINDOW", "REGISTRY", "SCORERS", "Rope", "ScoreInputs", "Scorer", "check_scorer", "layer_ropes",
           "score"]


def check_scorer(scorer: str) -> str:
    if scorer not in REGISTRY:
        raise ValueError(f"unknown scorer {scorer!r}; allowed: {', '.join(SCORERS)}")
    return scorer


def score(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
          scale: float | None = None, rope: Rope | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [B, H_kv, T] (float32) of scorer `name`; q [B, Hq, C, D], k/v [B, H_kv, T, D], valid [B, H_kv, T].

    scale None: 1/sqrt(D). rope: the layer's RoPE (`layer_ropes(config)[layer]`), needed by
    expected_attention. queries [B, C] bool: the chunk's real queries (None: all of them).
    """
    return REGISTRY[check_scorer(name)].fn(ScoreInputs(q, k, v, valid, scale, rope, queries))
