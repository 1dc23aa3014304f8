"""Rewrite each cache-backed SDPA into one `lukv::attend` op (runtime/ops.py).

The op serves a query chunk of any length: the prompt, a new turn, a prefill chunk or one decode
token, so there is no prefill/decode split and one graph serves every chunk length Dynamo sees as
dynamic. SDPA nodes not fed by a LUKVCache (sliding-window layers) stay exact and are reported once; a
graph with attention but no LUKVCache at all is an error: compiling with lukv and running uncompressed
in silence is never what the user asked for.
"""

from __future__ import annotations

import torch
from torch import fx

from lukv_compile import compat
from lukv_compile.log import report_once
from lukv_compile.passes.find_attention import (
    AttentionSite,
    UnsupportedAttention,
    find_attention_sites,
    sdpa_arg,
    softmax_scale,
)


def rewrite_site(graph: fx.Graph, site: AttentionSite) -> None:
    marker = site.marker
    with graph.inserting_before(site.sdpa):
        out = graph.call_function(torch.ops.lukv.attend.default, (
            site.query, marker.arg("k"), marker.arg("v"), sdpa_arg(site.sdpa, 3, "attn_mask"),
            bool(sdpa_arg(site.sdpa, 5, "is_causal", False)), marker.arg("handle"), marker.layer_idx,
            softmax_scale(site.sdpa)))
    out.meta.update(site.sdpa.meta)
    for read, marker_input in site.size_reads:
        read.replace_input_with(read.args[0], marker_input)
    site.sdpa.replace_all_uses_with(out)
    graph.erase_node(site.sdpa)
    for node in reversed(site.chain):  # repeat_kv steps, then the marker's getitems, then the marker
        graph.erase_node(node)
    graph.erase_node(marker.node)


def rewrite_attention(gm: fx.GraphModule, buffers_served: int = 0) -> list[AttentionSite]:
    """Rewrite every cache-backed attention in `gm`; return the sites (rewritten or left exact).
    `buffers_served`: attentions over the model's own KV buffers rewritten before (rewrite_buffer_attention)."""
    sites = find_attention_sites(gm.graph)
    if sites and not buffers_served and all(site.marker is None for site in sites):
        raise UnsupportedAttention(
            "lukv: this forward's attention reads no LUKVCache, so nothing would be compressed. Generate with "
            "the compiled model (it creates the cache), or pass cache=lukv_compile.LUKVCache(model.config, ...) "
            "to a hand-written forward; a model keeping its own KV buffers must write them in place and attend over "
            "them with a causal mask (README: Your own PyTorch model)")
    exact = [site.module_path for site in sites if site.marker is None]
    if exact:
        report_once(f"lukv: {len(exact)} attention layer(s) left exact, their K/V do not come from a LUKVCache "
                    f"ragged layer (sliding-window layers): {', '.join(exact)}")
        compat.counters()["lukv"]["sdpa_left_exact"] += len(exact)
    served = [site for site in sites if site.marker is not None]
    if (served or buffers_served) and torch.is_grad_enabled() and any(p.meta.get("example_value") is not None and
                                                  getattr(p.meta["example_value"], "requires_grad", False)
                                                  for p in gm.graph.find_nodes(op="placeholder")):
        raise UnsupportedAttention("lukv: this forward tracks gradients, but KV eviction is for inference and "
                                   "has no backward: call the model under torch.no_grad() or "
                                   "torch.inference_mode() (generate() does this itself)")
    for site in sites:
        if site.marker is not None:
            rewrite_site(gm.graph, site)
            compat.counters()["lukv"]["sdpa_rewritten"] += 1
    gm.graph.lint()
    gm.recompile()
    return sites
