"""Rewrite each attention over a model's own KV buffers (find_buffer_attention.py) into one `lukv::attend_at` op.

The two in-place writes, the GQA expansion and SDPA go; the op gets the chunk's K/V, where they were to be
written, the buffers themselves (to free their memory), the mask or prefix end, and the cache handle. The
positions are copied where the write was: a model may advance the tensor they view before attention runs
(torchtune's `cache_pos.add_`).
"""

from __future__ import annotations

import torch
from torch import fx

from lukv_compile import compat
from lukv_compile.passes.find_attention import sdpa_arg, softmax_scale
from lukv_compile.passes.find_buffer_attention import BufferSite


def positions_at_write(graph: fx.Graph, site: BufferSite) -> fx.Node:
    """The chunk's positions as a tensor, taken where the K write was."""
    positions = site.keys.positions
    with graph.inserting_before(site.keys.write):
        if isinstance(positions, slice):
            return graph.call_function(torch.arange, (positions.start or 0, positions.stop))
        return graph.call_function(torch.clone, (positions,))


def rewrite_buffer_site(graph: fx.Graph, site: BufferSite, handle: fx.Node, layer_idx: int) -> None:
    keys, values = site.keys, site.values
    positions = positions_at_write(graph, site)
    with graph.inserting_before(site.sdpa):
        out = graph.call_function(torch.ops.lukv.attend_at.default, (
            site.query, keys.new, values.new, positions, keys.buffer, values.buffer,
            sdpa_arg(site.sdpa, 3, "attn_mask"), bool(sdpa_arg(site.sdpa, 5, "is_causal", False)), keys.kv_end,
            handle, layer_idx, softmax_scale(site.sdpa)))
    out.meta.update(site.sdpa.meta)
    site.sdpa.replace_all_uses_with(out)
    graph.erase_node(site.sdpa)
    for node in (*reversed(keys.chain), *reversed(values.chain), keys.write, values.write):
        graph.erase_node(node)


def rewrite_buffer_attention(gm: fx.GraphModule, sites: list[BufferSite], cache_number: int) -> None:
    """Rewrite the attentions over KV buffers `find_buffer_attention` found in `gm`, layer i being the i-th in
    graph order, served by the cache `cache_number` names (runtime/registry.py).

    The graph makes the cache's handle tensor itself, once: every op declares it mutated, so the ops are
    chained through it as the LUKVCache ops are through theirs (runtime/ops.py).
    """
    with gm.graph.inserting_before(sites[0].keys.write):
        handle = gm.graph.call_function(torch.full, ((), cache_number), {"dtype": torch.int64})
    for layer_idx, site in enumerate(sites):
        rewrite_buffer_site(gm.graph, site, handle, layer_idx)
        compat.counters()["lukv"]["buffer_sdpa_rewritten"] += 1
    gm.graph.lint()
    gm.recompile()
