"""Chunked prefill: a long prompt in chunks of C tokens, each head evicted back to its budget after every
chunk, so the K/V a layer holds never exceed its budget plus C tokens per head (the whole prompt's K/V
is never materialised at once).

generate() does this itself when the cache's settings have `prefill_chunk`; hand-written loops call
`chunked_prefill` directly.
"""

from __future__ import annotations

import torch

from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.layer import RaggedLayer


def packed(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides. `.contiguous()` keeps a [1, n] slice's stride (it counts as
    contiguous), and Dynamo guards on it."""
    return t.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def chunked_prefill(forward, cache: LUKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    chunk: int = 1024, leave: int = 0, position_ids: torch.Tensor | None = None,
                    **kwargs) -> torch.Tensor | None:
    """Feed input_ids [B, T] (after what the cache already holds) through `forward` C tokens at a time.

    `forward` is the compiled model (or module). The last `leave` tokens are not fed (generate() leaves
    one for its own first step). `position_ids` [B | 1, T], when given, are sliced per chunk (else the
    model numbers the tokens from what the cache holds). Returns the logits of the last chunk fed, or
    None if none was.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    start, end = cache.get_seq_length(), input_ids.shape[1] - leave
    logits = None
    with cache.evicting_every_chunk():
        for first in range(start, end, chunk):
            last = min(first + chunk, end)
            # Only the inputs there are, contiguous: Dynamo guards on the keywords and the strides, so a key
            # more or a strided slice would be one graph more.
            if attention_mask is not None:
                kwargs["attention_mask"] = packed(attention_mask[:, :last])
            if position_ids is not None:
                kwargs["position_ids"] = packed(position_ids[:, first:last])
            logits = forward(input_ids=packed(input_ids[:, first:last]), cache=cache, **kwargs).logits
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    if logits is not None and ragged:
        ragged[0].warn_if_kept_whole(ragged[0].real_tokens)  # about the whole prompt, not its first chunk
    return logits
