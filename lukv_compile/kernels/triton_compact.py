"""Triton compaction of the selected prompt tokens into the ragged segment layout.

Same result as `reference.compact_into_segments`: head after head (flat b * H + h), each head's kept
tokens in position order followed by `room` free slots. The segment metadata is a few small torch ops;
the K/V/position copy is one program per (batch row, KV head) that walks T in blocks and finds each
kept token's slot with a running prefix sum (tl.cumsum) of the selection mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lukv_compile.kernels import reference
from lukv_compile.kernels.triton_decode import SUM

BLOCK_T = 64


@triton.jit
def _compact_kernel(
    selected_ptr, k_ptr, v_ptr, start_ptr, keys_ptr, values_ptr, positions_ptr,
    seq_len, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_keys, stride_values,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):
    head = tl.program_id(0)  # flat b * H + h
    b = head // HEADS
    h = head % HEADS
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    sel_base = selected_ptr + head.to(tl.int64) * seq_len
    next_slot = tl.load(start_ptr + head).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    for tile in range(0, seq_len, BLOCK):
        pos = tile + tl.arange(0, BLOCK)
        keep = tl.load(sel_base + pos, mask=pos < seq_len, other=0) != 0
        rank = tl.associative_scan(keep.to(tl.int32), 0, SUM)  # 1-based rank in this tile
        dest = next_slot + rank - 1
        row_mask = keep[:, None] & dim_ok[None, :]
        k = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=row_mask)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=row_mask)
        tl.store(keys_ptr + dest[:, None] * stride_keys + dims[None, :], k.to(keys_ptr.dtype.element_ty),
                 mask=row_mask)
        tl.store(values_ptr + dest[:, None] * stride_values + dims[None, :], v.to(values_ptr.dtype.element_ty),
                 mask=row_mask)
        tl.store(positions_ptr + dest, pos.to(positions_ptr.dtype.element_ty), mask=keep)
        next_slot += tl.reduce(keep.to(tl.int32), 0, SUM)


def check_compact_inputs(selected: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, H, T, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if selected.shape != k.shape[:3] or selected.dtype != torch.bool:
        raise ValueError(f"selected must be bool {tuple(k.shape[:3])}, got {selected.dtype} {tuple(selected.shape)}")
    if keys.dim() != 2 or keys.shape[1] != k.shape[3] or values.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [S, D={k.shape[3]}]")
    if keys.stride(1) != 1 or values.stride(1) != 1:
        raise ValueError("keys and values must have unit stride along head_dim")


def triton_compact_into_segments(selected: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                                 values: torch.Tensor, positions: torch.Tensor, seg_start: torch.Tensor,
                                 seg_len: torch.Tensor, seg_cap: torch.Tensor, room: int) -> None:
    """Same contract and result as `reference.compact_into_segments` (writes the cache in place)."""
    check_compact_inputs(selected, k, v, keys, values)
    b, h, t, d = k.shape
    kept = selected.sum(dim=-1)  # [B, H]
    cap, start = reference.segment_layout(kept, room, keys.shape[0])
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    positions.fill_(-1)
    _compact_kernel[(b * h,)](
        selected.to(torch.int8, memory_format=torch.contiguous_format), k, v, start, keys, values, positions,
        t, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keys.stride(0), values.stride(0),
        HEADS=h, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK=BLOCK_T,
    )
    reference.write_segment_metadata(kept, cap, start, seg_start, seg_len, seg_cap)
