"""The masked simulation: what a compressed cache must compute, without one.

A dense eager attention over the full-length cache that masks exactly the tokens each KV head evicted gives
the same logits as the LU-KV ragged cache with the same evictions. `masked_reference(model, cache)` is a copy of
the model that attends that way, masking what `cache` (a LUKVCache that ran the same inputs) holds no more.
"""

from __future__ import annotations

import copy

import torch

from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.layer import RaggedLayer

ATTENTION = "lukv_masked_simulation"


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense eager attention; after the prompt it also masks the tokens the LU-KV cache evicted, per KV head."""
    b, hq, q_len, d = query.shape
    group = hq // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    logits = query.float() @ key.float().transpose(-1, -2) * (scaling or d**-0.5)
    visible = torch.ones(b, 1, q_len, key.shape[2], dtype=torch.bool, device=query.device).tril(key.shape[2] - q_len)
    if attention_mask is not None:
        visible = visible & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    kept = getattr(module, "lukv_kept", None)
    if key.shape[2] > q_len and kept is not None:  # every forward after the prompt's
        visible = visible & kept[:, :, : key.shape[2]].repeat_interleave(group, dim=1)[:, :, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # padding rows see nothing
    return (probs @ value.float()).to(query.dtype).transpose(1, 2).contiguous(), probs


def register() -> None:
    """Make the attention known to transformers (its registries are global: done when a reference is made,
    never at import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, masked_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # boolean 4-D padding + causal masks


def kept_mask(layer: RaggedLayer, batch: int, total: int) -> torch.Tensor:
    """[B, H_kv, total] bool: which positions each KV head of `layer` still holds."""
    mask = torch.zeros(batch, layer.kv_heads, total, dtype=torch.bool)
    for b, row in enumerate(layer.kept_positions()):
        for h, positions in enumerate(row):
            mask[b, h, positions.long().cpu()] = True
    return mask


def masked_reference(model: torch.nn.Module, cache: LUKVCache, total: int) -> torch.nn.Module:
    """A copy of `model` whose compressible layers mask what `cache` evicted over `total` positions (its
    sliding-window layers keep transformers' own window mask)."""
    register()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(ATTENTION)
    batch = next(layer.store.batch for layer in cache.layers if isinstance(layer, RaggedLayer) and layer.store)
    attentions = {m.layer_idx: m for m in reference.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RaggedLayer):
            if i not in attentions:  # unmasked, the reference would silently differ from what the cache computes
                raise ValueError(f"masked_reference: found no attention module (with layer_idx and o_proj) for "
                                 f"layer {i} of this {type(model).__name__}")
            attentions[i].lukv_kept = kept_mask(layer, batch, total).to(next(model.parameters()).device)
    return reference
