"""CUDA kernels of the `lukv::` ops: Triton where it pays, the torch reference for the rest.

Importing this module registers them (`ops.py` imports it when CUDA is available). `append_kv` keeps its
default (reference) implementation on every device: it is a few O(B * H) index copies.
"""

from __future__ import annotations

import torch

import lukv_compile.kernels.ops  # noqa: F401  (defines the lukv:: ops registered below)
from lukv_compile import scorers
from lukv_compile.kernels import reference
from lukv_compile.kernels.triton_compact import triton_compact_into_segments
from lukv_compile.kernels.triton_decode import triton_decode_attention
from lukv_compile.kernels.triton_snapkv import triton_snapkv_scores


@torch.library.register_kernel("lukv::decode_attention", "cuda")
def decode_attention_cuda(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                          seg_len: torch.Tensor, scale: float) -> torch.Tensor:
    return triton_decode_attention(q, keys, values, seg_start, seg_len, scale)


def prefill_scores(scorer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """`scorers.score`, with SnapKV's window attention done by the Triton kernel."""
    if scorer == "snapkv":
        return triton_snapkv_scores(q, k, valid, scale)
    return scorers.score(scorer, q, k, v, valid, scale)


@torch.library.register_kernel("lukv::evict_prefill", "cuda")
def evict_prefill_cuda(*args) -> None:
    """`reference.evict_prefill` with Triton scoring (SnapKV) and Triton compaction."""
    reference.evict_prefill(*args, score_fn=prefill_scores, compact_fn=triton_compact_into_segments)
