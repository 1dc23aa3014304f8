"""The `lukv::` custom ops: the only contract between the compiled graph and the cache.

    cache_marker(k, v, handle, layer_idx) -> (k, v)
        What a LUKVCache layer's `update()` returns. It ties an attention's new K/V to a cache layer so
        the FX pass can find it; the pass replaces every marker, so running one means the lukv backend
        did not rewrite that attention (its eager kernel says why).

    attend(q, k, v, attn_mask, is_causal, handle, layer_idx, scale) -> out [B, Hq, C, D]
        One forward's attention for a query chunk of any length C: append the chunk's K/V to the layer's
        ragged storage, attend each query over its head's kept tokens plus the chunk's tokens up to itself,
        and evict when the cache's settings say so (cache.RaggedLayer.attend).

`handle` is a 0-d int64 CPU tensor naming the cache (registry.py); `layer_idx` is the layer. The storage
and the policy live in the cache object, outside the graph: the graph never reads a tensor the ops
mutate, and policy changes never recompile. What `attend` changes is state the compiler cannot see, so it
is declared an ordered side effect (compat.declare_ordered_effect): AOT threads an effect token through
every call, and no pass may reorder two calls, merge two alike, or drop one whose output goes unused. The marker's
argument names below are the schema the FX pass reads (passes/find_attention.py reads them by name).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lukv_compile import compat
from lukv_compile.runtime import registry


@torch.library.custom_op("lukv::cache_marker", mutates_args=())
def cache_marker(k: Tensor, v: Tensor, handle: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
    raise RuntimeError(registry.outside_backend_message(layer_idx))


@cache_marker.register_fake
def _(k, v, handle, layer_idx):
    return torch.empty_like(k), torch.empty_like(v)


# cudagraph_unsafe: under mode="reduce-overhead" inductor captures CUDA graphs between the attend calls
# (graph partitions) and runs attend itself eagerly: a replayed graph would skip its host-side work.
@torch.library.custom_op("lukv::attend", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, handle: Tensor,
           layer_idx: int, scale: float) -> Tensor:
    return registry.layer(handle, layer_idx).attend(q, k, v, attn_mask, is_causal, scale)


@attend.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


compat.declare_ordered_effect("lukv::attend")

MARKER_ARGS = tuple(a.name for a in torch.ops.lukv.cache_marker.default._schema.arguments)
