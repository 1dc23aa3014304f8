"""Expected Attention (Devoto et al. 2025), as kvpress's ExpectedAttentionPress defines it, with its defaults.

Future queries are modelled as a Gaussian: the mean and covariance (divided by n) of the chunk's pre-RoPE
queries, leaving out the first N_SINK, moved to the next N_FUTURE positions by the average RoPE rotation
R = mean_f R(T + f): mu' = R mu, cov' = R cov R^T. A key's logit is mu'.k s + k^T cov' k s^2 / 2 (s is the
attention scale, kvpress's 1/sqrt(d)); softmax over the head's tokens after its first N_SINK, GQA-group
mean, times ||v|| (epsilon 0). The first N_SINK tokens get the head's top score, as kvpress pads them.

The compiled graph only shows post-RoPE queries q_i = R(p_i) q_pre_i. RoPE's 2-D rotations share their
planes, so they commute: R(T + f) R(p_i)^T = R(f) R(d_i) with d_i = T - p_i, the query's distance to the
end of the chunk. So rotating each post-RoPE query forward by d_i (y_i = R(d_i) q_i) and then applying
A = mean_f R(f) gives kvpress's statistics exactly, without absolute positions: mu' = A mean(y),
cov' = A cov(y) A^T. RoPE's attention_scaling multiplies both q_i and kvpress's R, so it cancels.
"""

from __future__ import annotations

import torch

from lukv_compile.policy.scorers.common import Rope, ScoreInputs, Scorer, group_mean, per_query_head

N_SINK = 4
N_FUTURE = 512


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] times diag(cos) + rotate_half diag(sin), cos/sin [..., D/2]: a RoPE rotation, or a mean of them."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def angles(distance: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D/2] float32 of positions `distance` [N] (angles in float64: exact far from 0)."""
    theta = distance.double()[:, None] * rope.inv_freq.to(distance.device, torch.float64)[None, :]
    return theta.cos().float(), theta.sin().float()


def used_queries(queries: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: each row's real queries but the first N_SINK (at least one is kept when the row has any)."""
    rank = queries.long().cumsum(dim=-1) - 1
    skip = (queries.sum(dim=-1, keepdim=True) - 1).clamp(min=0, max=N_SINK)
    return queries & (rank >= skip)


def future_query_stats(x: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """mu' [B, Hq, D] and cov' [B, Hq, D, D]: the query Gaussian averaged over the next N_FUTURE positions."""
    rope = x.rope
    if rope is None:
        raise ValueError("expected_attention needs the model's RoPE frequencies: pass rope=Rope(inv_freq)")
    c, d = x.q.shape[2], x.q.shape[3]
    if 2 * rope.inv_freq.numel() != d:
        raise ValueError(f"expected_attention: rope has {rope.inv_freq.numel()} frequencies for head_dim {d} "
                         "(only full-width RoPE is supported)")
    device = x.q.device
    y = rotate(x.q.float(), *angles(torch.arange(c, 0, -1, device=device), rope))  # query i moved by C - i
    weights = used_queries(x.queries)[:, None, :, None].float()  # [B, 1, C, 1]
    n = weights.sum(dim=2, keepdim=True).clamp_min(1.0)
    mu = (y * weights).sum(dim=2, keepdim=True) / n  # [B, Hq, 1, D]
    centred = (y - mu) * weights
    cov = centred.transpose(-1, -2) @ centred / n  # [B, Hq, D, D]
    cos, sin = (a.mean(dim=0) for a in angles(torch.arange(N_FUTURE, device=device), rope))
    # rotate() acts on the last dim: M -> M A^T, so A cov A^T = (A (cov A^T)^T)^T.
    return rotate(mu[:, :, 0], cos, sin), rotate(rotate(cov, cos, sin).transpose(-1, -2), cos, sin).transpose(-1, -2)


def expected_attention_scores(x: ScoreInputs) -> torch.Tensor:
    hq, h = x.q.shape[1], x.k.shape[1]
    mu, cov = future_query_stats(x)
    kq = per_query_head(x.k.float(), hq)  # [B, Hq, T, D]
    logits = (kq @ mu[..., None]).squeeze(-1) * x.scale + 0.5 * x.scale**2 * ((kq @ cov) * kq).sum(-1)
    sink = x.valid & (x.valid.long().cumsum(dim=-1) <= N_SINK)  # each head's first N_SINK tokens
    attn = logits.masked_fill(~per_query_head(x.valid & ~sink, hq), float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
    scores = group_mean(attn, h) * x.v.float().norm(dim=-1)
    return torch.where(sink, scores.amax(dim=-1, keepdim=True), scores)


SCORER = Scorer("expected_attention", expected_attention_scores, window=1, needs_rope=True)
