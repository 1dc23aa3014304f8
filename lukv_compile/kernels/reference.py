"""Vectorised PyTorch reference of every LU-KV kernel (the CPU path, and the ground truth for Triton).

All of them work on one layer of the ragged cache layout (docs/architecture.md):

    keys, values  [S, D]   every kept/appended token of every (batch row, KV head), head-contiguous
    positions     [S]      int32, original sequence position of the token in the slot (-1: free)
    seg_start     [B, H]   int64, first slot of head (b, h)'s segment
    seg_len       [B, H]   int32, tokens held by the segment (kept + appended)
    seg_cap       [B, H]   int32, slots reserved for the segment (kept + decode room)
    seen          [1]      int64, tokens the sequence has had (padding included): the next position

No Python loops over heads or tokens: gathers, scatters and segment reductions only.
"""

from __future__ import annotations

import torch

from lukv_compile import scorers
from lukv_compile.budgets import adaptive_keep


def slot_owners(seg_start: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[S] int64: the flat head id b * H + h whose segment holds each slot (segments tile [0, S) in order)."""
    slots = torch.arange(num_slots, device=seg_start.device)
    # right=True: an empty segment shares its start with the next one, which owns the slot.
    return torch.searchsorted(seg_start.flatten(), slots, right=True) - 1


def slot_is_live(owner: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor) -> torch.Tensor:
    """[S] bool: the slot holds a token (it is below its segment's current length)."""
    offset = torch.arange(owner.shape[0], device=owner.device) - seg_start.flatten()[owner]
    return offset < seg_len.flatten().long()[owner]


# Up to this many KV heads (batch rows x heads) one dense matmul over all slots, masked to each head's own
# segment, beats the per-slot gathers: the wasted products cost less than the gathered [S, G, D] copies.
DENSE_DECODE_MAX_HEADS = 8


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                     seg_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new query per head over each KV head's own kept tokens.

    q [B, Hq, 1, D] -> [B, Hq, 1, D] (contiguous, q's dtype). Every query head of a GQA group attends
    to its KV head's live slots; a head with no tokens outputs zeros.
    """
    if seg_start.numel() <= DENSE_DECODE_MAX_HEADS:
        return decode_attention_dense(q, keys, values, seg_start, seg_len, scale)
    return decode_attention_by_slot(q, keys, values, seg_start, seg_len, scale)


def decode_attention_dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                           seg_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Few heads: logits of every query against every slot (two GEMMs), -inf outside the head's segment."""
    b, hq, _, d = q.shape
    h = seg_start.shape[1]
    slot = torch.arange(keys.shape[0], device=q.device)
    first = seg_start.reshape(b * h, 1)
    own = (slot >= first) & (slot < first + seg_len.reshape(b * h, 1))  # [B*H, S]
    logits = torch.mm(q.reshape(b * hq, d).float() * scale, keys.float().t())
    logits.view(b * h, hq // h, -1).add_(torch.where(own, 0.0, float("-inf"))[:, None, :])
    probs = logits.softmax(dim=-1).nan_to_num_(0.0)  # a head with no tokens: all -inf -> nan -> 0
    return torch.mm(probs, values.float()).view(b, hq, 1, d).to(q.dtype)


def decode_attention_by_slot(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seg_start: torch.Tensor,
                             seg_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Many heads: reads every live slot once, for all the query heads of its GQA group (segment reductions)."""
    b, hq, _, d = q.shape
    h = seg_start.shape[1]
    group = hq // h
    owner = slot_owners(seg_start, keys.shape[0])
    q_heads = q.reshape(b * h, group, d).float()
    logits = torch.einsum("sgd,sd->sg", q_heads[owner], keys.float()) * scale  # [S, G]
    logits = logits.masked_fill(~slot_is_live(owner, seg_start, seg_len)[:, None], float("-inf"))
    row_max = torch.full((b * h, group), float("-inf"), device=q.device)
    row_max = row_max.scatter_reduce(0, owner[:, None].expand(-1, group), logits, "amax")
    weights = (logits - row_max[owner]).exp().nan_to_num_(0.0)  # dead slots: exp(-inf) = 0
    denom = torch.zeros(b * h, group, device=q.device).index_add_(0, owner, weights)
    out = torch.zeros(b * h, group, d, device=q.device)
    out.index_add_(0, owner, weights[:, :, None] * values.float()[:, None, :])
    out = out / denom.clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]
    return out.view(b, hq, 1, d).to(q.dtype)


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
              seg_cap: torch.Tensor, seen: torch.Tensor) -> None:
    """Append one decode token per (b, h) at the end of its segment: O(1) per head, no layer copy."""
    b, h, _, d = k_new.shape
    slots = (seg_start + seg_len).flatten()
    keys.index_copy_(0, slots, k_new.reshape(b * h, d).to(keys.dtype))
    values.index_copy_(0, slots, v_new.reshape(b * h, d).to(values.dtype))
    positions.index_copy_(0, slots, seen.to(positions.dtype).expand(b * h))
    seg_len.add_(1)
    seen.add_(1)


def check_room(seg_len: torch.Tensor, seg_cap: torch.Tensor) -> None:
    """Refuse to append past a segment's capacity (that would overwrite the next head's tokens)."""
    full = (seg_len >= seg_cap).any()
    if full.is_cuda:  # no host sync per decode step on the GPU (and CUDA-graph safe): an async device assert
        torch._assert_async(~full, "LUKVCache is full: prepare it with a larger max_new_tokens")
    elif bool(full):
        raise RuntimeError(
            f"LUKVCache is full: a KV head holds {int(seg_cap.min())} slots and all are used; "
            "prepare the cache with a larger max_new_tokens (generate does this from max_new_tokens)"
        )


def valid_from_mask(attn_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """[B, T] bool: the tokens the last query may see, i.e. the real (non-padding) tokens."""
    if attn_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    last_row = attn_mask[:, 0, -1, :]
    valid = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
    return valid.expand(batch, length)


def protect_and_mask(scores: torch.Tensor, valid: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Padding -> -inf (never kept); the first `sink` and last `window` real tokens -> +inf (always kept)."""
    rank = valid.long().cumsum(dim=-1) - 1
    count = valid.sum(dim=-1, keepdim=True)
    protected = valid & ((rank < sink) | (rank >= count - window))
    scores = scores.float().masked_fill(protected[:, None, :], float("inf"))
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def select_tokens(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, H, T] bool: each head's top-`keep[b, h]` tokens (stable: ties go to the earlier token)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    chosen = torch.arange(scores.shape[-1], device=scores.device) < keep[..., None]
    return torch.zeros_like(chosen).scatter_(-1, order, chosen)


def evict_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, seg_start: torch.Tensor,
                  seg_len: torch.Tensor, seg_cap: torch.Tensor, budget: torch.Tensor, seen: torch.Tensor,
                  scorer: str, sink: int, window: int, adaptive: bool, room: int, scale: float,
                  score_fn=scorers.score, compact_fn=None) -> None:
    """Score the prompt, keep each head's top-b tokens and compact them into the layer's segments.

    `score_fn` / `compact_fn` let a device swap in its own kernels (kernels/cuda.py) for the same steps.
    """
    b, h, t, d = k.shape
    if int(seen) != 0:
        raise RuntimeError("LUKVCache already holds a sequence: call cache.reset() before a new prompt "
                           "(multi-token continuation after eviction is not supported)")
    valid = valid_from_mask(attn_mask, b, t, k.device)
    scores = protect_and_mask(score_fn(scorer, q, k, v, valid, scale), valid, sink, window)
    keep = adaptive_keep(scores, budget.sum(dim=-1)) if adaptive else budget.long()
    keep = torch.minimum(keep, valid.sum(dim=-1, keepdim=True))
    (compact_fn or compact_into_segments)(select_tokens(scores, keep), k, v, keys, values, positions, seg_start,
                                          seg_len, seg_cap, room)
    seen.fill_(t)


def segment_layout(kept: torch.Tensor, room: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacities [B*H] (kept + room) and starts [B*H] of segments laid head after head."""
    cap = (kept + room).flatten()
    if int(cap.sum()) > num_slots:
        raise RuntimeError(f"eviction keeps {int(cap.sum())} slots but the layer has {num_slots}")
    return cap, cap.cumsum(0) - cap


def write_segment_metadata(kept: torch.Tensor, cap: torch.Tensor, start: torch.Tensor, seg_start: torch.Tensor,
                           seg_len: torch.Tensor, seg_cap: torch.Tensor) -> None:
    shape = seg_start.shape
    seg_start.copy_(start.view(shape))
    seg_len.copy_(kept.view(shape))
    seg_cap.copy_(cap.view(shape))


def compact_into_segments(selected: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, positions: torch.Tensor, seg_start: torch.Tensor,
                          seg_len: torch.Tensor, seg_cap: torch.Tensor, room: int) -> None:
    """Lay the selected tokens out head after head (position order), each followed by `room` free slots."""
    b, h, t, d = k.shape
    kept = selected.sum(dim=-1)  # [B, H]
    cap, start = segment_layout(kept, room, keys.shape[0])
    dest = (start.view(b, h, 1) + selected.long().cumsum(dim=-1) - 1)[selected]
    keys.index_copy_(0, dest, k[selected].to(keys.dtype))
    values.index_copy_(0, dest, v[selected].to(values.dtype))
    token_pos = torch.arange(t, device=k.device, dtype=positions.dtype).expand(b, h, t)
    positions.fill_(-1).index_copy_(0, dest, token_pos[selected])
    write_segment_metadata(kept, cap, start, seg_start, seg_len, seg_cap)
