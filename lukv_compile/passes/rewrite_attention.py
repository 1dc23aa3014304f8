"""Rewrite each cache-backed SDPA node into LU-KV ops.

Prefill (query length > 1): attention stays the exact SDPA over the whole prompt; an
`lukv::evict_prefill` call is added after it, which scores the prompt and compacts each KV head's
top-b tokens into the ragged layer.

Decode (query length 1): the SDPA over the cache is replaced by `lukv::append_kv` (write the new token
at the end of each head's segment) and `lukv::decode_attention` (attend each head's kept tokens).

SDPA nodes not fed by a LUKVCache layer stay exact and are reported once, with the reason.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import fx
from torch._dynamo.utils import counters

from lukv_compile.passes.find_attention import AttentionSite, arg, find_attention_sites

log = logging.getLogger("lukv_compile")
_reported: set[str] = set()

# cache_marker(k_new, v_new, keys, values, positions, seg_start, seg_len, seg_cap, budget, seen,
#              layer_idx, scorer, sink, window, adaptive, room)
K_NEW, V_NEW, KEYS, VALUES, POSITIONS, SEG_START, SEG_LEN, SEG_CAP, BUDGET, SEEN = range(10)
SCORER, SINK, WINDOW, ADAPTIVE, ROOM = range(11, 16)


def report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


def query_shape(site: AttentionSite) -> torch.Size:
    return site.query.meta["example_value"].shape


def softmax_scale(site: AttentionSite) -> float:
    scale = arg(site.sdpa, 6, "scale")
    return float(scale) if scale is not None else 1.0 / math.sqrt(query_shape(site)[-1])


def is_decode(site: AttentionSite) -> bool:
    q_len = query_shape(site)[2]
    return isinstance(q_len, int) and q_len == 1


def rewrite_decode(graph: fx.Graph, site: AttentionSite) -> None:
    m = site.marker.args
    with graph.inserting_before(site.sdpa):
        graph.call_function(torch.ops.lukv.append_kv.default,
                            (m[K_NEW], m[V_NEW], m[KEYS], m[VALUES], m[POSITIONS], m[SEG_START], m[SEG_LEN],
                             m[SEG_CAP], m[SEEN]))
        out = graph.call_function(torch.ops.lukv.decode_attention.default,
                                  (site.query, m[KEYS], m[VALUES], m[SEG_START], m[SEG_LEN],
                                   softmax_scale(site)))
    out.meta.update(site.sdpa.meta)
    site.sdpa.replace_all_uses_with(out)
    dead = [site.sdpa.args[1], site.sdpa.args[2]]
    graph.erase_node(site.sdpa)
    erase_unused(graph, dead)


def rewrite_prefill(graph: fx.Graph, site: AttentionSite) -> None:
    m = site.marker.args
    # SDPA reads the new K/V directly (the marker was an identity for them).
    for user in list(site.marker.users):
        user.replace_all_uses_with(m[K_NEW] if user.args[1] == 0 else m[V_NEW])
        graph.erase_node(user)
    graph.erase_node(site.marker)
    with graph.inserting_after(site.sdpa):
        graph.call_function(torch.ops.lukv.evict_prefill.default,
                            (site.query, m[K_NEW], m[V_NEW], arg(site.sdpa, 3, "attn_mask"), m[KEYS], m[VALUES],
                             m[POSITIONS], m[SEG_START], m[SEG_LEN], m[SEG_CAP], m[BUDGET],
                             m[SEEN], m[SCORER], m[SINK], m[WINDOW], m[ADAPTIVE], m[ROOM], softmax_scale(site)))


def erase_unused(graph: fx.Graph, nodes: list) -> None:
    """Erase the now-unused shape steps (repeat_kv) and markers that fed a replaced SDPA."""
    while nodes:
        node = nodes.pop()
        if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and not node.users:
            nodes.extend(a for a in node.args if isinstance(a, fx.Node))
            graph.erase_node(node)


def rewrite_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Rewrite every cache-backed attention in `gm`; return the sites (rewritten or not)."""
    sites = find_attention_sites(gm.graph)
    for site in sites:
        if site.marker is None:
            report_once(f"lukv: attention {site.module_path} left exact: {site.reason}")
            counters["lukv"]["sdpa_left_exact"] += 1
            continue
        if site.reason:
            raise NotImplementedError(f"lukv: cannot rewrite attention of layer {site.layer_idx} "
                                      f"({site.module_path}): {site.reason}")
        (rewrite_decode if is_decode(site) else rewrite_prefill)(gm.graph, site)
        counters["lukv"]["sdpa_rewritten"] += 1
    gm.graph.lint()
    gm.recompile()
    return sites
