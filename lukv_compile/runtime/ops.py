"""The `lukv::` custom ops: the only contract between the compiled graph and the cache.

    cache_marker(k, v, handle, layer_idx) -> (k, v)
        What a LUKVCache layer's `update()` returns. It ties an attention's new K/V to a cache layer so
        the FX pass can find it; the pass replaces every marker, so running one means the lukv backend
        did not rewrite that attention (its eager kernel says why).

    attend(q, k, v, attn_mask, is_causal, handle, layer_idx, scale) -> out [B, Hq, C, D]
        One forward's attention for a query chunk of any length C: append the chunk's K/V to the layer's
        ragged storage, attend each query over its head's kept tokens plus the chunk's tokens up to itself,
        and evict when the cache's settings say so (cache.RaggedLayer.attend).

    attend_at(q, k, v, positions, k_buffer, v_buffer, attn_mask, is_causal, kv_end, handle, layer_idx, scale)
        The same for a model that keeps its own dense KV buffers (gpt-fast, torchtune): the chunk's K/V were
        to be written into `k_buffer` / `v_buffer` at `positions` and attention read the buffers (the whole
        buffer under `attn_mask`, or the prefix `[:kv_end]`). The op checks that this reading is causal over
        the written positions, serves it from the layer's ragged storage, and frees the dense buffers'
        memory (RaggedLayer.attend_at, runtime/buffers.py).

`handle` is a 0-d int64 CPU tensor naming the cache (registry.py); `layer_idx` is the layer. The storage
and the policy live in the cache object, outside the graph: the graph never reads storage the ops change,
and policy changes never recompile. What `attend` changes is the cache the handle names, so it is declared
to mutate `handle` (`mutates_args`): every call of one cache then depends on the one before it through the
handle, and no compiler pass may reorder two calls, merge two alike, or drop one whose output goes unused
(tests/test_citizen.py). The bytes of the handle never change; functionalisation and re-inplacing cost
nothing at run time. (An ordered-effect declaration would do the same, but inductor cannot cache graphs
holding its `with_effects` operator, so warm start would save nothing.) The marker's argument names below are
the schema the FX pass reads (passes/find_attention.py reads them by name).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lukv_compile.runtime import registry


@torch.library.custom_op("lukv::cache_marker", mutates_args=())
def cache_marker(k: Tensor, v: Tensor, handle: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
    raise RuntimeError(registry.outside_backend_message(layer_idx))


@cache_marker.register_fake
def _(k, v, handle, layer_idx):
    return torch.empty_like(k), torch.empty_like(v)


# cudagraph_unsafe: under mode="reduce-overhead" inductor captures CUDA graphs between the attend calls
# (graph partitions) and runs attend itself eagerly: a replayed graph would skip its host-side work.
@torch.library.custom_op("lukv::attend", mutates_args=("handle",), tags=(torch.Tag.cudagraph_unsafe,))
def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, handle: Tensor,
           layer_idx: int, scale: float) -> Tensor:
    return registry.layer(handle, layer_idx).attend(q, k, v, attn_mask, is_causal, scale)


@attend.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


@torch.library.custom_op("lukv::attend_at", mutates_args=("handle",), tags=(torch.Tag.cudagraph_unsafe,))
def attend_at(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_buffer: Tensor, v_buffer: Tensor,
              attn_mask: Tensor | None, is_causal: bool, kv_end: int, handle: Tensor, layer_idx: int,
              scale: float) -> Tensor:
    return registry.layer(handle, layer_idx).attend_at(q, k, v, positions, (k_buffer, v_buffer), attn_mask,
                                                       is_causal, kv_end, scale)


@attend_at.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


MARKER_ARGS = tuple(a.name for a in torch.ops.lukv.cache_marker.default._schema.arguments)
