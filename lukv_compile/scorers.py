"""Token scorers: which tokens a KV head keeps.

One function per method, each mapping the prefill's post-RoPE queries/keys/values to scores
`[B, H_kv, T]` at KV-head granularity (higher = keep). The runtime eviction and the offline profiler
both call `score()`, so a profile measures exactly what runs.

Keys come per KV head, right-aligned: `valid` [B, H_kv, T] is False where a head has no token (left
padding of a prompt, or a head holding fewer tokens than the longest), and the queries [B, Hq, C, D] are
the chunk's, aligned with the last C key positions. Protected tokens (sink, window) are handled by the
selection step, not here; scorers only use `valid` to keep empty slots out of their statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lukv_compile.profile import check_scorer

SNAPKV_WINDOW = 32
SNAPKV_POOL = 7
EXPECTED_ATTENTION_EPSILON = 0.02


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, H_kv, ...]: mean over the query heads of each GQA group."""
    b, hq = x.shape[:2]
    return x.view(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:]).mean(dim=2)


def per_query_head(valid: torch.Tensor, q_heads: int) -> torch.Tensor:
    """valid [B, H_kv, T] -> [B, Hq, T] (every query head of a GQA group sees its KV head's tokens)."""
    return valid.repeat_interleave(q_heads // valid.shape[1], dim=1)


def window_queries(q: torch.Tensor, window: int) -> torch.Tensor:
    # Left padding puts every row's real tokens at the end, so the last `window` positions are real.
    return q[:, :, -min(window, q.shape[2]):, :]


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float,
                  obs_window: int = SNAPKV_WINDOW, pool: int = SNAPKV_POOL) -> torch.Tensor:
    """SnapKV: attention of the last `obs_window` queries, averaged over them, max-pooled, GQA-group mean."""
    hq = q.shape[1]
    h, t = k.shape[1], k.shape[2]
    qw = window_queries(q, obs_window).float()
    w = qw.shape[2]
    kq = k.float().repeat_interleave(hq // h, dim=1)
    logits = torch.matmul(qw, kq.transpose(-1, -2)) * scale  # [B, Hq, w, T]
    query_pos = torch.arange(t - w, t, device=q.device)
    causal = torch.arange(t, device=q.device)[None, :] <= query_pos[:, None]
    visible = causal[None, None] & per_query_head(valid, hq)[:, :, None, :]
    attn = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
    per_token = attn.mean(dim=2)  # [B, Hq, T]
    pooled = F.max_pool1d(per_token, kernel_size=pool, stride=1, padding=pool // 2)
    return group_mean(pooled, h)


def keydiff_scores(k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KeyDiff: keys least similar to the mean normalised key are kept (score = -cosine)."""
    kn = F.normalize(k.float(), dim=-1)
    weights = valid[..., None].float()
    anchor = (kn * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)  # [B, H, D]
    return -F.cosine_similarity(kn, anchor[:, :, None, :], dim=-1)


def expected_attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                              scale: float, obs_window: int = SNAPKV_WINDOW,
                              epsilon: float = EXPECTED_ATTENTION_EPSILON) -> torch.Tensor:
    """Expected Attention: attention a Gaussian model of future queries would pay, times ||v||.

    The query distribution is the mean and covariance of the last `obs_window` post-RoPE queries
    (kvpress re-rotates them to future positions; we only see post-RoPE queries in the graph).
    E[exp(q.k * s)] for q ~ N(mu, S) is exp(mu.k * s + s^2 k^T S k / 2).
    """
    hq, h = q.shape[1], k.shape[1]
    qw = window_queries(q, obs_window).float()
    mu = qw.mean(dim=2)  # [B, Hq, D]
    centred = qw - mu[:, :, None]
    cov = centred.transpose(-1, -2) @ centred / max(qw.shape[2] - 1, 1)  # [B, Hq, D, D]
    kq = k.float().repeat_interleave(hq // h, dim=1)  # [B, Hq, T, D]
    mean_term = (kq @ mu[..., None]).squeeze(-1) * scale
    var_term = 0.5 * scale * scale * ((kq @ cov) * kq).sum(-1)
    logits = (mean_term + var_term).masked_fill(~per_query_head(valid, hq), float("-inf"))
    attn = logits.softmax(dim=-1).nan_to_num_(0.0)
    return group_mean(attn, h).add_(epsilon) * v.float().norm(dim=-1)


def streaming_scores(k: torch.Tensor) -> torch.Tensor:
    """StreamingLLM: the most recent tokens score highest (sink tokens are protected separately)."""
    b, h, t, _ = k.shape
    return torch.arange(t, device=k.device, dtype=torch.float32).expand(b, h, t)  # right-aligned: newest last


def score(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
          scale: float | None = None) -> torch.Tensor:
    """Scores [B, H_kv, T] (float32) for scorer `name`; q [B, Hq, C, D], k/v [B, H_kv, T, D], valid [B, H_kv, T]."""
    check_scorer(name)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if name == "snapkv":
        return snapkv_scores(q, k, valid, scale)
    if name == "keydiff":
        return keydiff_scores(k, valid)
    if name == "expected_attention":
        return expected_attention_scores(q, k, v, valid, scale)
    return streaming_scores(k)
