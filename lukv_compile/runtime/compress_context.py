"""Task-agnostic context compression ranked by reconstruction: keep what the model needs to repeat the context.

`compress_context(model, cache, context_ids, repeat_ids(tokenizer, text))` prefills the context
(uncompiled), ranks every token by its utility to repeating the context (profiling/reconstruction.py) and
fills an empty `LUKVCache` with each head's budget of top tokens (the cache's budgets: a profile solved for
this ranking, `lukv profile --scorer reconstruction`, or any other). A compiled model then continues from
it (the question, later turns) as from any compressed prompt. The pass costs a second forward that records
attention (measured 6x a plain prefill's wall time at 1k, 15x at 8k on 2 CPU cores), so it is an explicit
call, not a scorer option, and its result is worth saving (`cache.save`, runtime/saved.py).
"""

from __future__ import annotations

import numpy as np
import torch

from lukv_compile.policy.eviction import keep_mask
from lukv_compile.profiling.oracle import record_prefill
from lukv_compile.profiling.reconstruction import reconstruction_utility
from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.layer import RaggedLayer
from lukv_compile.runtime.storage import RaggedStore


def _check(model, cache: LUKVCache, context_ids: torch.Tensor, reconstruction: list[int]) -> torch.Tensor:
    if isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
        raise ValueError("compress_context needs the plain model, not the torch.compile wrapper (pass model, "
                         "not compiled): its reconstruction pass records attention eagerly")
    if not isinstance(cache, LUKVCache):
        raise TypeError(f"cache must be a LUKVCache, got {type(cache).__name__}")
    if not cache.can_mask_chunks:
        raise ValueError("compress_context supports models whose every layer is compressible; this one has "
                         "sliding-window layers")
    if any(layer.store is not None for layer in cache.layers):
        raise ValueError("compress_context needs an empty LUKVCache (call cache.reset() first)")
    if not reconstruction:
        raise ValueError("the reconstruction token ids are empty (make them with repeat_ids)")
    ids = torch.as_tensor(context_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"context_ids must be one sequence ([T] or [1, T]), got shape {tuple(ids.shape)}")
    p = cache.profile
    if ids.shape[1] <= p.sink + p.window:
        raise ValueError(f"a context of {ids.shape[1]} tokens leaves nothing to evict with sink={p.sink} + "
                         f"window={p.window}")
    return ids


@torch.no_grad()
def compress_context(model, cache: LUKVCache, context_ids: torch.Tensor, reconstruction: list[int]) -> torch.Tensor:
    """Prefill `context_ids` into the empty `cache`, keeping each head's budget of tokens by reconstruction utility.

    reconstruction: `repeat_ids(tokenizer, context_text)`. Returns the context's next-token logits [vocab].
    """
    ids = _check(model, cache, context_ids, reconstruction)
    cache.check_model(model.config)
    cache.meet_model(model)
    record = record_prefill(model, ids)
    utility = reconstruction_utility(model, record, reconstruction)
    length = record.context_len
    p = cache.profile
    for layer in cache.layers:
        assert isinstance(layer, RaggedLayer)  # _check: every layer is compressible
        i = layer.layer_idx
        keys, values = record.k[i].to(model.dtype), record.v[i].to(model.dtype)  # [1, H, P, D]
        budget = torch.as_tensor(layer.budget(np.array([length])), device=keys.device)
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        kept = keep_mask(utility[i][None], valid, budget, sink=p.sink, window=p.window,
                         adaptive=cache.settings.policy == "adakv")
        positions = torch.arange(length, device=keys.device).expand(keys.shape[:3])
        layer.store = RaggedStore(1, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        layer.store.replace(kept, keys, values, positions)
        layer.seen, layer.real_tokens = length, np.array([length], dtype=np.int64)
    return record.last_logits
