"""Task-agnostic context compression: keep what the model needs to repeat the context (KVzip's idea).

`compress_context(model, cache, context_ids, repeat_ids(tokenizer, text))` prefills the context
(uncompiled), scores every token by what repeating the context needs (profiling/reconstruction.py) and fills
an empty `LUKVCache` with the top tokens. Three scorings: `kvzip` (default: KVzip's, the largest attention weight
a repetition query gives the token, unpooled), `kvzip_pooled` (that weight max-pooled over 7 tokens: better on
passkey documents, worse with several questions, docs/results.md split 6) and `reconstruction` (our utility,
attention x value-output norm, pooled over 7 tokens). Selections: `global` (default: KVzip's, one threshold over
every head of every layer for the cache's total; each head's protected tokens kept; the cache's profile gives the
total, sink and window), `floored_global` (the same with AdaKV's floor per head) and `budgets` (each head keeps the
cache's per-head budget: a profile solved for the reconstruction ranking, `lukv profile --scorer reconstruction`,
or any other). The defaults were chosen on held-out data: on the multi-question protocol at 0.8, KVzip's scoring
under its global selection kept 77% of the full cache's score on split 4 where the reconstruction ranking on its
LU-KV budgets kept 27%, and 71% pooled over splits 4-7 (docs/results.md: short of the 90% aimed for).
A compiled model then continues from it (the question, later turns) as from any compressed prompt. The pass
costs a second forward that records attention (measured 6x a plain prefill's wall time at 1k, 15x at 8k on 2
CPU cores), so it is an explicit call, not a scorer option, and its result is worth saving (`cache.save`,
runtime/saved.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lukv_compile.log import report_once
from lukv_compile.policy.budgets import ADAKV_FLOOR, global_keep_counts
from lukv_compile.policy.eviction import keep_mask
from lukv_compile.profiling.oracle import PrefillRecord, record_prefill
from lukv_compile.profiling.reconstruction import KVZIP, check_scoring, context_utility
from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.layer import RaggedLayer
from lukv_compile.runtime.storage import RaggedStore

SELECTIONS = ("global", "floored_global", "budgets")
GLOBAL_FLOOR = {"global": 0.0, "floored_global": ADAKV_FLOOR}  # each head's guaranteed share of the mean budget


def _check(model, cache: LUKVCache, context_ids: torch.Tensor, selection: str) -> torch.Tensor:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; allowed: {', '.join(SELECTIONS)}")
    if isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
        raise ValueError("compress_context needs the plain model, not the torch.compile wrapper (pass model, "
                         "not compiled): its reconstruction pass records attention eagerly")
    if not isinstance(cache, LUKVCache):
        raise TypeError(f"cache must be a LUKVCache, got {type(cache).__name__}")
    if not cache.can_mask_chunks:
        raise ValueError("compress_context supports models whose every layer is compressible; this one has "
                         "sliding-window layers")
    if selection in GLOBAL_FLOOR and cache.settings.policy == "adakv":
        raise ValueError(f"selection {selection!r} splits the whole model's total by the scores; AdaKV's policy "
                         f"splits each layer's: use one (policy 'lukv' with selection {selection!r}, or selection "
                         "'budgets')")
    if any(layer.store is not None for layer in cache.layers):
        raise ValueError("compress_context needs an empty LUKVCache (call cache.reset() first)")
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
def compress_context(model, cache: LUKVCache, context_ids: torch.Tensor, reconstruction: list[int],
                     scoring: str = KVZIP, selection: str = "global") -> torch.Tensor:
    """Prefill `context_ids` into the empty `cache`, keeping the top tokens by `scoring` under `selection`.

    reconstruction: `repeat_ids(tokenizer, context_text)`. Returns the context's next-token logits [vocab].
    """
    check_scoring(scoring)
    if not reconstruction:
        raise ValueError("the reconstruction token ids are empty (make them with repeat_ids)")
    return fill_by_utility(model, cache, context_ids,
                           lambda record: context_utility(model, record, reconstruction, scoring), selection)


@torch.no_grad()
def fill_by_utility(model, cache: LUKVCache, context_ids: torch.Tensor,
                    utility_of: Callable[[PrefillRecord], torch.Tensor], selection: str = "budgets") -> torch.Tensor:
    """Prefill `context_ids` (uncompiled) and fill the empty `cache` with the top tokens by `utility_of(record)`
    [L, H_kv, P] under `selection`; returns the context's next-token logits [vocab]. compress_context's scorings
    use it, and so does the evaluation's oracle (the utility of a whole known conversation)."""
    ids = _check(model, cache, context_ids, selection)
    cache.check_model(model.config)
    cache.meet_model(model)
    record = record_prefill(model, ids)
    utility = utility_of(record)
    length = record.context_len
    p = cache.profile
    budgets = torch.as_tensor(np.stack([layer.budget(np.array([length]))[0] for layer in cache.layers]))  # [L, H]
    if selection in GLOBAL_FLOOR:
        budgets = global_keep_counts(utility, budgets, p.sink, p.window, GLOBAL_FLOOR[selection])
        if p.scope != "uniform" and cache.settings.profile is not None:  # a profile the user chose, not found
            report_once(f"lukv: compress_context kept tokens by one threshold over every head (selection "
                        f"{selection!r}); the cache's {p.scorer} profile gave only the total and the protected "
                        "tokens, not its per-head budgets (pass selection='budgets' to keep those)")
    for layer in cache.layers:
        assert isinstance(layer, RaggedLayer)  # _check: every layer is compressible
        i = layer.layer_idx
        keys, values = record.k[i].to(model.dtype), record.v[i].to(model.dtype)  # [1, H, P, D]
        valid = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
        kept = keep_mask(utility[i][None], valid, budgets[i][None].to(keys.device), sink=p.sink, window=p.window,
                         adaptive=cache.settings.policy == "adakv")
        positions = torch.arange(length, device=keys.device).expand(keys.shape[:3])
        layer.store = RaggedStore(1, keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        layer.store.replace(kept, keys, values, positions)
        layer.seen, layer.real_tokens = length, np.array([length], dtype=np.int64)
    return record.last_logits
