"""PyTorch kernels on the ragged layout: the CPU path, and the ground truth for the Triton kernels.

Attention works per (batch row, KV head) on that head's own segment of the flat [S, D] storage
(storage.py): the GQA group's queries against only the tokens the head keeps, so the work is exactly
proportional to what is kept (no dense mask over every slot, no per-step owner search).

A decode step calls this 30 times per token on a model like SmolLM2, so the per-call host work is kept
small: metadata is read once as Python ints, and a decode step's per-head outputs are concatenated
rather than written into a zeroed buffer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def segment_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: np.ndarray,
                      length: np.ndarray, counts: np.ndarray, scale: float,
                      prefix: tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """Attention of a query chunk over each KV head's segment, causal inside the chunk.

    q [B, Hq, C, D]; start/length [B, H] (host); the last counts[b] tokens of each of row b's segments are
    the chunk's real tokens, matching the last counts[b] queries (the chunk's padding is on the left).
    Real query i attends to its head's tokens up to and including itself; padding queries output zeros.
    prefix: (keys, values, start, length) of tokens each head holds before its segment (a forked cache's
    shared prefix, runtime/storage.py), seen by every real query.
    Returns [B, Hq, C, D] in q's dtype, contiguous.
    """
    if prefix is None and q.shape[2] == 1 and bool((counts == 1).all()) and bool((length > 0).all()):
        return decode_attention(q, keys, values, start, length, scale)
    b, hq, c, d = q.shape
    h = start.shape[1]
    group = hq // h
    out = q.new_zeros(b, hq, c, d)
    for row, (starts, lengths) in enumerate(zip(start.tolist(), length.tolist(), strict=True)):
        real = int(counts[row])
        if real == 0:
            continue
        for head, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            k = keys[s:s + n].to(q.dtype)[None, None]
            v = values[s:s + n].to(q.dtype)[None, None]
            queries = q[row, head * group:(head + 1) * group, c - real:][None]
            mask = None
            if real > 1:  # query i sees the n - real kept tokens and the chunk up to itself
                last_seen = n - real + torch.arange(real, device=q.device)
                mask = torch.arange(n, device=q.device)[None, :] <= last_seen[:, None]
            if prefix is None:
                result = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            else:
                ps, pn = int(prefix[2][row, head]), int(prefix[3][row, head])
                result = two_part_attention(queries, prefix[0][ps:ps + pn], prefix[1][ps:ps + pn], k[0, 0], v[0, 0],
                                            mask, scale)
            out[row, head * group:(head + 1) * group, c - real:] = result[0]
    return out


def two_part_attention(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
                       mask2: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of q [1, G, R, D] over keys k1 [N1, D] then k2 [N2, D] (mask2 [R, N2] on the second),
    without concatenating the keys: one softmax over both parts' scores, in fp32."""
    s1 = q.float() @ k1.float().T * scale
    s2 = q.float() @ k2.float().T * scale
    if mask2 is not None:
        s2 = s2.masked_fill(~mask2, float("-inf"))
    p = torch.softmax(torch.cat([s1, s2], dim=-1), dim=-1)
    return (p[..., :k1.shape[0]] @ v1.float() + p[..., k1.shape[0]:] @ v2.float()).to(q.dtype)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: np.ndarray,
                     length: np.ndarray, scale: float) -> torch.Tensor:
    """`segment_attention` for one real query per row and no empty head: a decode step."""
    b, hq, _, d = q.shape
    h = start.shape[1]
    groups = q.reshape(b * h, hq // h, 1, d)  # row-major (row, KV head): each KV head's GQA group of queries
    # Plain slices and views: indexing with None costs more host time than the small SDPA calls themselves.
    heads = [F.scaled_dot_product_attention(groups[i:i + 1], keys[s:s + n].to(q.dtype).view(1, 1, n, d),
                                            values[s:s + n].to(q.dtype).view(1, 1, n, d), scale=scale,
                                            enable_gqa=True)
             for i, (s, n) in enumerate(zip(start.reshape(-1).tolist(), length.reshape(-1).tolist(), strict=True))]
    return torch.cat(heads, dim=1).view(b, hq, 1, d)
