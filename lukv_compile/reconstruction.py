"""Task-agnostic context compression ranked by reconstruction: keep what the model needs to repeat the context.

A scorer that sees only the context cannot know which fact a later question will ask for; the oracle
(the profiler's utility of the actual question) can. This ranks every context token instead by the
oracle utility of a self-supervised question: the model is asked to repeat the context and the context
is teacher-forced as its answer (KVzip's idea, Kim et al. 2025); a token's score is the profiler's
utility (attention x value-output norm, max over the reconstruction's queries and the GQA group,
`profiling.oracle.decode_importance`). The budgets stay the cache's LU-KV budgets.

It costs a second, uncompiled forward of the context over the full K/V (about 2x a plain prefill), so it
is an explicit call, not a scorer option: `compress_context(model, cache, context_ids, repeat_ids)` fills
an empty `LUKVCache` with the kept tokens; a compiled model then continues from it (the question, later
turns) as from any compressed prompt. The evaluation's `reconstruction` scorer selects with the same
functions (eval/simulate.py).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from lukv_compile.cache import LUKVCache, RaggedLayer
from lukv_compile.eviction import keep_mask
from lukv_compile.profiling.oracle import PrefillRecord, record_prefill, recording, utility_hook
from lukv_compile.storage import RaggedStore

REPEAT_REQUEST = "Repeat the text above exactly."
_MARK = "\x00context\x00"


def chat_parts(tokenizer, text: str) -> tuple[str, str]:
    """The chat template around a user message of a context then `text`: (before the context, after it).

    The context starts the user's message; `text` (after a blank line) ends it, then the assistant's turn
    starts, so the second part is what follows the context.
    """
    template = tokenizer.apply_chat_template([{"role": "user", "content": f"{_MARK}\n\n{text}"}], tokenize=False,
                                             add_generation_prompt=True)
    before, after = template.split(_MARK)
    return before, after


def repeat_ids(tokenizer, context_text: str, chat: bool = True) -> list[int]:
    """Token ids of the reconstruction: the repeat request after the context, then the context's text."""
    request = chat_parts(tokenizer, REPEAT_REQUEST)[1] if chat else f"\n\n{REPEAT_REQUEST}"
    return (tokenizer.encode(request, add_special_tokens=False)
            + tokenizer.encode(context_text, add_special_tokens=False))


@torch.no_grad()
def reconstruction_utility(model, record: PrefillRecord, reconstruction: list[int]) -> torch.Tensor:
    """[L, H_kv, P] float32: the oracle utility of `reconstruction` over the recorded context (its cache is copied)."""
    if not reconstruction:
        raise ValueError("the reconstruction token ids are empty")
    importance = torch.zeros(record.num_layers, record.num_kv_heads, record.context_len, device=record.k[0].device)

    cache = copy.deepcopy(record.cache)
    with recording(model, utility_hook(importance, record)):
        model(input_ids=torch.tensor([reconstruction], device=record.k[0].device), cache=cache, logits_to_keep=1)
    return importance


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
