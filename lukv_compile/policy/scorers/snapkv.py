"""SnapKV (Li et al. 2024): keep the tokens the prompt's last queries attend to.

As published (the SnapKV repository's configs: window 32, max pooling, kernel 7): the attention of the
last WINDOW queries (softmax over the head's tokens, causal inside the window) is averaged over them and
max-pooled along the sequence over the prefix only, the tokens before the observation window; the
window's own tokens keep their unpooled score (the selection protects them anyway), so pooling never
spreads the window's self-attention onto the prefix. Then the GQA-group mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lukv_compile.policy.scorers.common import ScoreInputs, Scorer, group_mean, per_query_head, window_queries

WINDOW = 32
POOL = 7


def window_attention_mean(x: ScoreInputs, obs_window: int) -> torch.Tensor:
    """[B, Hq, T] float32: attention of the last `obs_window` real queries, summed over them / the window."""
    hq = x.q.shape[1]
    t = x.k.shape[2]
    qw = window_queries(x.q, obs_window).float()
    w = qw.shape[2]
    logits = torch.matmul(qw, per_query_head(x.k.float(), hq).transpose(-1, -2)) * x.scale  # [B, Hq, w, T]
    query_pos = torch.arange(t - w, t, device=x.q.device)
    causal = torch.arange(t, device=x.q.device)[None, :] <= query_pos[:, None]
    visible = causal[None, None] & per_query_head(x.valid, hq)[:, :, None, :]
    attn = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num_(0.0)
    attn = attn * x.queries[:, None, -w:, None]  # padding queries (left of the real ones) count for nothing
    return attn.mean(dim=2)


def pool_prefix(per_token: torch.Tensor, window: int, pool: int = POOL) -> torch.Tensor:
    """Max-pool [B, Hq, T] over its first T - window tokens only; the last `window` pass through."""
    split = per_token.shape[-1] - window
    if split <= 0:
        return per_token
    prefix = F.max_pool1d(per_token[..., :split], kernel_size=pool, stride=1, padding=pool // 2)
    return torch.cat([prefix, per_token[..., split:]], dim=-1)


def from_window_mean(per_token: torch.Tensor, window: int, num_kv_heads: int, pool: int = POOL) -> torch.Tensor:
    """SnapKV's scores [B, H_kv, T] from the window's mean attention [B, Hq, T] (also the Triton path's tail)."""
    return group_mean(pool_prefix(per_token, window, pool), num_kv_heads)


def snapkv_scores(x: ScoreInputs, obs_window: int = WINDOW, pool: int = POOL) -> torch.Tensor:
    w = min(obs_window, x.q.shape[2])
    return from_window_mean(window_attention_mean(x, w), w, x.k.shape[1], pool)


SCORER = Scorer("snapkv", snapkv_scores, window=WINDOW)
