"""Triton decode attention over the ragged per-head KV cache (flash-decoding).

One program per (batch row, KV head, split): it streams its share of the head's segment
[seg_start, seg_start + seg_len) in BLOCK_N-slot tiles and loads each K/V tile once for all the query
heads of the GQA group (q tile [GROUP_PAD, D] @ K tile^T). With one split the program normalises and
writes the output; with several, each writes a partial (max, sum, acc) and `_combine_kernel` merges them.
A forked cache's heads also read a shared prefix (runtime/storage.py): the same kernel writes the prefix's
partials beside the head's own, and one combine merges both.
Accumulation is fp32 whatever the input dtype; a head with no tokens outputs zeros (as the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_N = 64
MIN_SLOTS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
PROGRAMS_PER_SM = 4

# Reductions are tl.reduce / tl.associative_scan with triton's own combine functions rather than
# tl.max / tl.sum / tl.cumsum (and no tl.zeros / tl.cdiv): those wrappers are jit functions fixed when
# triton is imported, so the CPU interpreter cannot call them once triton came in (torch._dynamo imports
# it) before TRITON_INTERPRET=1 was set. The interpreter runs these combine functions as numpy reductions.
MAX = tl.standard._elementwise_max
SUM = tl.standard._sum_combine


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    qk_scale, stride_q, stride_k, stride_v, stride_o, part_offset, part_stride,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, WRITE_PARTS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    head = tl.program_id(0)  # flat KV head b * H + h
    split = tl.program_id(1)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q_rows = head * GROUP + rows  # query heads of this group, flat b * Hq + hq
    q = tl.load(q_ptr + q_rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    seg_start = tl.load(start_ptr + head).to(tl.int64)
    seg_len = tl.load(len_ptr + head).to(tl.int32)
    # Whole tiles per split (integer ceil by hand, see above).
    per_split = ((seg_len + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK - 1) // BLOCK * BLOCK
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seg_len)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, BLOCK_D], 0.0, tl.float32)
    cols = tl.arange(0, BLOCK)
    for tile in range(lo, hi, BLOCK):
        offs = tile + cols
        col_ok = offs < hi
        slots = seg_start + offs
        tile_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_k + dims[None, :], mask=tile_mask, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * stride_v + dims[None, :], mask=tile_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))  # base-2 logits
        # Every tile holds at least one live slot, so m_new is finite and no exp sees inf - inf.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, SUM)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = row_ok[:, None] & dim_ok[None, :]
    if not WRITE_PARTS:
        out = acc / tl.maximum(l_i, 1.1754943508222875e-38)[:, None]  # empty head: 0 / tiny = 0
        tl.store(out_ptr + q_rows[:, None] * stride_o + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        part = q_rows * part_stride + part_offset + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)


@triton.jit
def _combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_o,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    q_row = tl.program_id(0)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < NUM_SPLITS
    dim_ok = dims < HEAD_DIM
    part = q_row * NUM_SPLITS + splits
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))
    l_part = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    m_max = tl.reduce(m, 0, MAX)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty head: every weight becomes exp2(-inf) = 0
    w = tl.exp2(m - m_max)
    denom = tl.maximum(tl.reduce(w * l_part, 0, SUM), 1.1754943508222875e-38)
    out = tl.reduce(w[:, None] * acc, 0, SUM) / denom
    tl.store(out_ptr + q_row * stride_o + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def needs_fp32_dot(a: torch.Tensor, b: torch.Tensor) -> bool:
    """tl.dot in fp32 (ieee) unless both operands share a 16-bit dtype the tensor cores take.

    Triton's CPU interpreter multiplies bf16 operands as raw integers (triton 3.9), so it gets fp32 too.
    """
    if a.dtype != b.dtype or a.dtype == torch.float32:
        return True
    return a.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def default_num_splits(q: torch.Tensor, keys: torch.Tensor, kv_heads: int) -> int:
    """Splits per KV head so the grid fills the GPU, each split still streaming >= MIN_SLOTS_PER_SPLIT slots.

    Uses the layer's slot count as the length estimate (no device -> host read of seg_len), so the
    choice is stable across decode steps and CUDA-graph safe.
    """
    if q.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, kv_heads)
    by_length = max(1, keys.shape[0] // (kv_heads * MIN_SLOTS_PER_SPLIT))
    return max(1, min(wanted, by_length, 64))


def check_decode_inputs(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                        seg_len: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, D] (one decode token), got {tuple(q.shape)}")
    b, hq, _, d = q.shape
    if seg_start.shape != seg_len.shape or seg_start.dim() != 2 or seg_start.shape[0] != b:
        raise ValueError(f"seg_start {tuple(seg_start.shape)} and seg_len {tuple(seg_len.shape)} must both be "
                         f"[B={b}, H]")
    if hq % seg_start.shape[1] != 0:
        raise ValueError(f"query heads {hq} must be a multiple of KV heads {seg_start.shape[1]}")
    if keys.shape != values.shape or keys.dim() != 2 or keys.shape[1] != d:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be [S, D={d}]")
    if keys.stride(1) != 1 or values.stride(1) != 1:
        raise ValueError("keys and values must have unit stride along head_dim")
    if keys.dtype != values.dtype:
        raise ValueError(f"keys ({keys.dtype}) and values ({values.dtype}) must share a dtype")


def triton_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                            seg_len: torch.Tensor, scale: float, num_splits: int | None = None,
                            prefix: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """As `reference.segment_attention` on one-token chunks; `num_splits` None picks `default_num_splits`.

    prefix: (keys, values, seg_start, seg_len) of a shared prefix each head reads before its own segment."""
    check_decode_inputs(q, keys, values, seg_start, seg_len)
    parts = [(keys, values, seg_start, seg_len)]
    if prefix is not None:
        check_decode_inputs(q, *prefix)
        parts.insert(0, prefix)
    b, hq, _, d = q.shape
    kv_heads = seg_start.numel()
    splits = [default_num_splits(q, part[0], kv_heads) if num_splits is None else num_splits for part in parts]
    if min(splits) < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q_rows = q.reshape(b * hq, d).contiguous()
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    total = sum(splits)
    part_m = part_l = part_acc = out  # unused when one program writes each output
    if total > 1:
        part_m = torch.empty(b * hq, total, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b * hq, total, d, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    group = hq // seg_start.shape[1]
    offset = 0
    for (k, v, start, length), n in zip(parts, splits, strict=True):
        _decode_kernel[(kv_heads, n)](
            q_rows, k, v, start.reshape(-1).contiguous(), length.reshape(-1).contiguous(), out,
            part_m, part_l, part_acc, scale * LOG2E, q_rows.stride(0), k.stride(0), v.stride(0),
            out.stride(0), offset, total, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK=BLOCK_N, NUM_SPLITS=n, WRITE_PARTS=total > 1,
            DOT_FP32=needs_fp32_dot(q, k),
        )
        offset += n
    if total > 1:
        _combine_kernel[(b * hq,)](part_m, part_l, part_acc, out, out.stride(0), HEAD_DIM=d, BLOCK_D=block_d,
                                   NUM_SPLITS=total, SPLITS_PAD=triton.next_power_of_2(total))
    return out.view(b, hq, 1, d)
