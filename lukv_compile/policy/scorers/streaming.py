"""StreamingLLM (Xiao et al. 2024): keep the most recent tokens (the sink tokens are protected separately)."""

from __future__ import annotations

import torch

from lukv_compile.policy.scorers.common import ScoreInputs, Scorer


def streaming_scores(x: ScoreInputs) -> torch.Tensor:
    """The slot index: keys are right-aligned, so the newest token scores highest."""
    b, h, t, _ = x.k.shape
    return torch.arange(t, device=x.k.device, dtype=torch.float32).expand(b, h, t)


SCORER = Scorer("streaming", streaming_scores, window=32)
