"""Chunked prefill: a long prompt in chunks of C tokens, each head evicted back to its budget after every
chunk, so the K/V a layer holds never exceed its budget plus C tokens per head (the whole prompt's K/V
is never materialised at once).

generate() does this itself when the cache's settings have `prefill_chunk`; hand-written loops call
`chunked_prefill` directly.
"""

from __future__ import annotations

import torch

from lukv_compile.cache import LUKVCache


@torch.no_grad()
def chunked_prefill(forward, cache: LUKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    chunk: int = 1024, leave: int = 0, **kwargs) -> torch.Tensor | None:
    """Feed input_ids [B, T] (after what the cache already holds) through `forward` C tokens at a time.

    `forward` is the compiled model (or module). The last `leave` tokens are not fed (generate() leaves
    one for its own first step). Returns the logits of the last chunk fed, or None if none was.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    start, end = cache.get_seq_length(), input_ids.shape[1] - leave
    logits = None
    with cache.evicting_every_chunk():
        for first in range(start, end, chunk):
            last = min(first + chunk, end)
            mask = None if attention_mask is None else attention_mask[:, :last]
            logits = forward(input_ids=input_ids[:, first:last], attention_mask=mask, cache=cache, **kwargs).logits
    return logits
