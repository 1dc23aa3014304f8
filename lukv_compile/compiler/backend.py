"""The `lukv` torch.compile backend: rewrite cache-backed attention, then hand off to an inner compiler.

The backend only chooses the inner compiler (`inner`, and inductor's `mode`); the policy options travel with the cache
(settings.py). torch.compile hands it `options=` as given; they were already validated when
`torch.compile` / `model.compile` was called (entry.py), and are validated again here for callers that
reach the backend another way.
"""

from __future__ import annotations

import torch
from torch import fx

from lukv_compile import compat
from lukv_compile.compiler.forward import running_forward
from lukv_compile.passes import find_buffer_attention, rewrite_attention, rewrite_buffer_attention
from lukv_compile.runtime import ops  # noqa: F401  (registers the lukv:: ops)
from lukv_compile.settings import LUKVSettings


def lukv_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor], *, mode: str | None = None,
                 options: dict | None = None):
    """torch.compile backend. `options`: see lukv_compile.settings.LUKVSettings; `mode` (or the `mode`
    option: torch.compile takes one of mode= and options=) goes to inductor."""
    settings = LUKVSettings.from_options(options)
    inner, mode = settings.inner, mode or settings.mode
    if mode is not None and inner != "inductor":
        raise ValueError(f"lukv: mode={mode!r} is inductor's; it needs inner='inductor', got inner={inner!r}")
    serve_attention(gm)
    compat.counters()["lukv"]["graphs_compiled"] += 1
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return compat.aot_eager(gm, example_inputs)
    return compat.inductor(gm, example_inputs, inductor_patches(mode))


def serve_attention(gm: fx.GraphModule) -> None:
    """Rewrite the attentions over the model's own KV buffers (served by the compiled model's buffer cache, whose
    handle the graph makes itself: a graph per compiled model) and those over a LUKVCache."""
    sites = find_buffer_attention(gm.graph)
    if sites:
        query, buffer = sites[0].query.meta["example_value"], sites[0].keys.buffer.meta["example_value"]
        cache = running_forward().cache_for_buffers(len(sites), query.shape[1], buffer.shape[1], buffer.shape[3])
        rewrite_buffer_attention(gm, sites, int(cache.handle))
    rewrite_attention(gm, buffers_served=len(sites))


def inductor_patches(mode: str | None) -> dict | None:
    """inductor config for `mode`; with CUDA graphs, partitioned around lukv::attend (cudagraph_unsafe)
    rather than skipped for the whole graph."""
    if not mode:
        return None
    patches = compat.inductor_mode_options(mode)
    return patches | {"graph_partition": True} if patches.get("triton.cudagraphs") else patches
