"""Triton SnapKV scoring: observation-window attention without a [heads, window, T] tensor in memory.

Two passes over the key tiles, one program row per (batch row, query head):
  1. `_window_stats_kernel` streams all T keys once and keeps each window query's running max and sum
     (online softmax, causal inside the window, padding masked by `valid`);
  2. `_window_mean_kernel`, one program per (head, key tile), recomputes the tile's logits, normalises
     them with those stats and writes the mean over the window queries into [B, Hq, T].
The rest of SnapKV (pooling over the prefix, the GQA-group mean) is `scorers.snapkv.from_window_mean` on that
[B, Hq, T] tensor, applied by the caller (eviction.score_candidates): kernels do not depend on scorers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lukv_compile.kernels.triton_decode import LOG2E, MAX, SUM, needs_fp32_dot

BLOCK_T = 64


@triton.jit
def _window_logits(q, k_base, valid_base, tile, query_pos, stride_kt, seq_len, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr):
    """Base-2 logits [W_PAD, BLOCK] of the window queries against keys [tile, tile + BLOCK); -inf where hidden."""
    keys_pos = tile + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    in_seq = keys_pos < seq_len
    k = tl.load(k_base + keys_pos[:, None] * stride_kt + dims[None, :],
                mask=in_seq[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    real = tl.load(valid_base + keys_pos, mask=in_seq, other=0) != 0
    visible = (keys_pos[None, :] <= query_pos[:, None]) & real[None, :]
    return tl.where(visible, s * qk_scale, float("-inf"))


@triton.jit
def _load_window_queries(q_ptr, k_ptr, stride_qb, stride_qh, stride_qt, seq_len, window,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, W_PAD: tl.constexpr,
                         HEADS: tl.constexpr, DOT_FP32: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.arange(0, W_PAD)
    dims = tl.arange(0, BLOCK_D)
    query_pos = seq_len - window + rows
    q_base = q_ptr + (bh // HEADS).to(tl.int64) * stride_qb + (bh % HEADS) * stride_qh
    q = tl.load(q_base + query_pos[:, None].to(tl.int64) * stride_qt + dims[None, :],
                mask=(rows[:, None] < window) & (dims[None, :] < HEAD_DIM), other=0.0)
    # Padded rows (rows >= window) get position -1: they see no key and contribute nothing.
    q = q.to(tl.float32) if DOT_FP32 else q.to(k_ptr.dtype.element_ty)
    return q, tl.where(rows < window, query_pos, -1)


@triton.jit
def _window_stats_kernel(
    q_ptr, k_ptr, valid_ptr, row_max_ptr, row_sum_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    seq_len, window, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    W_PAD: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    bh = tl.program_id(0)  # flat b * Hq + hq
    b = bh // HEADS
    q, query_pos = _load_window_queries(q_ptr, k_ptr, stride_qb, stride_qh, stride_qt, seq_len, window,
                                        HEAD_DIM, BLOCK_D, W_PAD, HEADS, DOT_FP32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + ((bh % HEADS) // GROUP) * stride_kh
    valid_base = valid_ptr + b.to(tl.int64) * stride_vb
    m_i = tl.full([W_PAD], float("-inf"), tl.float32)
    l_i = tl.full([W_PAD], 0.0, tl.float32)
    for tile in range(0, seq_len, BLOCK):
        s = _window_logits(q, k_base, valid_base, tile, query_pos, stride_kt, seq_len, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK, DOT_FP32)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing visible yet: no inf - inf
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.reduce(tl.exp2(s - m_ref[:, None]), 1, SUM)
        m_i = m_new
    rows = tl.arange(0, W_PAD)
    tl.store(row_max_ptr + bh * W_PAD + rows, m_i)
    tl.store(row_sum_ptr + bh * W_PAD + rows, l_i)


@triton.jit
def _window_mean_kernel(
    q_ptr, k_ptr, valid_ptr, row_max_ptr, row_sum_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    seq_len, window, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    W_PAD: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    bh = tl.program_id(0)
    tile = tl.program_id(1) * BLOCK
    b = bh // HEADS
    q, query_pos = _load_window_queries(q_ptr, k_ptr, stride_qb, stride_qh, stride_qt, seq_len, window,
                                        HEAD_DIM, BLOCK_D, W_PAD, HEADS, DOT_FP32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + ((bh % HEADS) // GROUP) * stride_kh
    valid_base = valid_ptr + b.to(tl.int64) * stride_vb
    s = _window_logits(q, k_base, valid_base, tile, query_pos, stride_kt, seq_len, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK, DOT_FP32)
    rows = tl.arange(0, W_PAD)
    m_i = tl.load(row_max_ptr + bh * W_PAD + rows)
    l_i = tl.load(row_sum_ptr + bh * W_PAD + rows)
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    # l >= 1 once a row sees a key (its max term is exp2(0)); a row that sees nothing scores 0 (nan -> 0).
    inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1.0), 0.0)
    p = tl.exp2(s - m_ref[:, None]) * inv_l[:, None]
    keys_pos = tile + tl.arange(0, BLOCK)
    tl.store(out_ptr + bh.to(tl.int64) * seq_len + keys_pos, tl.reduce(p, 0, SUM) / window,
             mask=keys_pos < seq_len)


def check_snapkv_inputs(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, obs_window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q must be [B, Hq, T, D] and k [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]}")
    if valid.shape != (q.shape[0], q.shape[2]) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool [B, T] = {(q.shape[0], q.shape[2])}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if not 1 <= obs_window <= 32:
        raise ValueError(f"obs_window must be in [1, 32] (one query tile), got {obs_window}")


def triton_window_attention_mean(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float,
                                 obs_window: int) -> torch.Tensor:
    """[B, Hq, T] float32: attention of the last `obs_window` queries, averaged over them."""
    check_snapkv_inputs(q, k, valid, obs_window)
    b, hq, t, d = q.shape
    window = min(obs_window, t)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    valid_bytes = valid.to(torch.int8, memory_format=torch.contiguous_format)
    w_pad = max(16, triton.next_power_of_2(window))  # tl.dot needs M >= 16
    row_max = torch.empty(b * hq, w_pad, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    out = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), valid_bytes.stride(0))
    meta = dict(GROUP=hq // k.shape[1], HEADS=hq, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                W_PAD=w_pad, BLOCK=BLOCK_T, DOT_FP32=needs_fp32_dot(q, k))
    _window_stats_kernel[(b * hq,)](q, k, valid_bytes, row_max, row_sum, *strides, t, window, scale * LOG2E,
                                    **meta)
    _window_mean_kernel[(b * hq, triton.cdiv(t, BLOCK_T))](q, k, valid_bytes, row_max, row_sum, out, *strides,
                                                          t, window, scale * LOG2E, **meta)
    return out

