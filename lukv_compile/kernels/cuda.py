"""CUDA kernels of the `lukv::` ops: Triton where it pays, the torch reference for the rest.

Importing this module registers them (`ops.py` imports it when CUDA is available). `append_kv` keeps its
default (reference) implementation on every device: it is a few O(B * H) index copies.
"""

from __future__ import annotations

import torch

import lukv_compile.kernels.ops  # noqa: F401  (defines the lukv:: ops registered below)
from lukv_compile import scorers
from lukv_compile.budgets import adaptive_keep
from lukv_compile.kernels import reference
from lukv_compile.kernels.triton_compact import triton_compact_into_segments
from lukv_compile.kernels.triton_decode import triton_decode_attention
from lukv_compile.kernels.triton_snapkv import triton_snapkv_scores


@torch.library.register_kernel("lukv::decode_attention", "cuda")
def decode_attention_cuda(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_owner: torch.Tensor,
                          seg_start: torch.Tensor, seg_len: torch.Tensor, scale: float) -> torch.Tensor:
    return triton_decode_attention(q, keys, values, slot_owner, seg_start, seg_len, scale)


def prefill_scores(scorer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """`scorers.score`, with SnapKV's window attention done by the Triton kernel."""
    if scorer == "snapkv":
        return triton_snapkv_scores(q, k, valid, scale)
    return scorers.score(scorer, q, k, v, valid, scale)


@torch.library.register_kernel("lukv::evict_prefill", "cuda")
def evict_prefill_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                       keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slot_owner: torch.Tensor,
                       seg_start: torch.Tensor, seg_len: torch.Tensor, seg_cap: torch.Tensor, budget: torch.Tensor,
                       seen: torch.Tensor, scorer: str, sink: int, window: int, adaptive: bool, room: int,
                       scale: float) -> None:
    """`reference.evict_prefill` with Triton scoring (SnapKV) and Triton compaction."""
    b, h, t, d = k.shape
    if int(seen) != 0:
        raise RuntimeError("LUKVCache already holds a sequence: call cache.reset() before a new prompt "
                           "(multi-token continuation after eviction is not supported)")
    valid = reference.valid_from_mask(attn_mask, b, t, k.device)
    scores = reference.protect_and_mask(prefill_scores(scorer, q, k, v, valid, scale), valid, sink, window)
    keep = adaptive_keep(scores, budget.sum(dim=-1)) if adaptive else budget.long()
    keep = torch.minimum(keep, valid.sum(dim=-1, keepdim=True))
    triton_compact_into_segments(reference.select_tokens(scores, keep), k, v, keys, values, positions, slot_owner,
                                 seg_start, seg_len, seg_cap, room)
    seen.fill_(t)
