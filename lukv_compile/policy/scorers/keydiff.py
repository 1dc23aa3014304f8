"""KeyDiff (Park et al. 2025): keep the keys least like the head's mean key direction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lukv_compile.policy.scorers.common import ScoreInputs, Scorer


def keydiff_scores(x: ScoreInputs) -> torch.Tensor:
    """Score = -cosine(key, mean of the head's normalised keys); query-independent."""
    kn = F.normalize(x.k.float(), dim=-1)
    weights = x.valid[..., None].float()
    anchor = (kn * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)  # [B, H, D]
    return -F.cosine_similarity(kn, anchor[:, :, None, :], dim=-1)


SCORER = Scorer("keydiff", keydiff_scores, window=1)
