"""Window Expected Attention: this project's first Expected Attention variant, kept under its own name.

Unlike the published method (expected_attention.py) it models future queries from the last WINDOW
post-RoPE queries as they are (no re-rotation to future positions, no sink queries left out), uses the
unbiased covariance and adds EPSILON to the attention before weighting by ||v||. The shipped
`*-window_expected_attention` profile was measured with it.
"""

from __future__ import annotations

import torch

from lukv_compile.policy.scorers.common import ScoreInputs, Scorer, group_mean, per_query_head, window_queries

WINDOW = 32
EPSILON = 0.02


def window_expected_attention_scores(x: ScoreInputs, obs_window: int = WINDOW,
                                     epsilon: float = EPSILON) -> torch.Tensor:
    """Attention a Gaussian fit of the last `obs_window` queries would pay, plus epsilon, times ||v||.

    E[exp(q.k s)] for q ~ N(mu, S) is exp(mu.k s + s^2 k^T S k / 2).
    """
    hq, h = x.q.shape[1], x.k.shape[1]
    qw = window_queries(x.q, obs_window).float()
    mu = qw.mean(dim=2)  # [B, Hq, D]
    centred = qw - mu[:, :, None]
    cov = centred.transpose(-1, -2) @ centred / max(qw.shape[2] - 1, 1)  # [B, Hq, D, D]
    kq = per_query_head(x.k.float(), hq)  # [B, Hq, T, D]
    mean_term = (kq @ mu[..., None]).squeeze(-1) * x.scale
    var_term = 0.5 * x.scale * x.scale * ((kq @ cov) * kq).sum(-1)
    logits = (mean_term + var_term).masked_fill(~per_query_head(x.valid, hq), float("-inf"))
    attn = logits.softmax(dim=-1).nan_to_num_(0.0)
    return group_mean(attn, h).add_(epsilon) * x.v.float().norm(dim=-1)


SCORER = Scorer("window_expected_attention", window_expected_attention_scores, window=1)
