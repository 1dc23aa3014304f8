"""Find every SDPA node in a Dynamo graph and the LUKVCache layer (if any) that feeds its K/V.

Runs before AOT, where each attention is one `scaled_dot_product_attention` call with readable
kwargs. K/V reach it in one of two GQA forms: KV-headed with `enable_gqa=True`, or expanded by
transformers' `repeat_kv` (`x[:, :, None]` -> `expand` -> `reshape`). We walk back through that
expansion to the `lukv::cache_marker` output, which carries the layer's storage tensors.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# Shape-only steps between a cache's K/V and SDPA (repeat_kv, layout fixes).
SHAPE_METHODS = {"expand", "reshape", "view", "contiguous"}
SHAPE_FUNCTIONS = {operator.getitem, torch.reshape}


@dataclass
class AttentionSite:
    sdpa: fx.Node
    marker: fx.Node | None  # the lukv::cache_marker call feeding K/V, None if not cache-backed
    reason: str = ""  # why the site cannot be rewritten ("" = it can)

    @property
    def query(self) -> fx.Node:
        return self.sdpa.args[0]

    @property
    def layer_idx(self) -> int:
        return self.marker.args[10]

    @property
    def module_path(self) -> str:
        stack = self.sdpa.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else self.sdpa.name


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.lukv.cache_marker, torch.ops.lukv.cache_marker.default)


def marker_output(node: fx.Node) -> tuple[fx.Node, int] | None:
    """Walk back through shape-only steps; return (marker node, output index) if we reach one."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is operator.getitem and is_marker(node.args[0]):
            return node.args[0], node.args[1]
        shape_step = (node.op == "call_method" and node.target in SHAPE_METHODS) or (
            node.op == "call_function" and node.target in SHAPE_FUNCTIONS)
        if not shape_step:
            return None
        node = node.args[0]
    return None


def arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def unsupported_reason(sdpa: fx.Node) -> str:
    dropout = arg(sdpa, 4, "dropout_p", 0.0)
    if dropout not in (0, 0.0):
        return f"dropout_p={dropout} (eviction is for inference: call model.eval())"
    q = sdpa.args[0].meta.get("example_value")
    if q is None or q.dim() != 4:
        return "query is not a 4-D [batch, heads, tokens, head_dim] tensor"
    return ""


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    sites = []
    for node in graph.nodes:
        if not is_sdpa(node):
            continue
        k_src, v_src = marker_output(node.args[1]), marker_output(node.args[2])
        if k_src is None or v_src is None:
            sites.append(AttentionSite(node, None, "its K/V do not come from a LUKVCache ragged layer"))
            continue
        if k_src[0] is not v_src[0] or (k_src[1], v_src[1]) != (0, 1):
            sites.append(AttentionSite(node, None, "K and V come from different cache layers"))
            continue
        sites.append(AttentionSite(node, k_src[0], unsupported_reason(node)))
    return sites
