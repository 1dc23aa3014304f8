"""Match every LUKVCache marker in a Dynamo graph to the one SDPA call its K/V feed, strictly.

Runs before AOT, where each attention is one `scaled_dot_product_attention` call with readable kwargs.
A marker's two outputs (the layer's new K and V) may reach SDPA only as its key and value, directly
(`enable_gqa=True`) or through transformers' `repeat_kv` expansion (`x[:, :, None, :, :]` -> `expand` ->
`reshape`). Any other use (a slice, a transpose, a matmul, a second consumer) would change what the
attention reads in a way the rewrite cannot honour, so it is an error naming the layer and the op.
Reading a marker output's size (`k.size()`, as `repeat_kv` does once the batch is dynamic) reads no data:
the rewrite points it at the marker's input, which has the same shape.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from lukv_compile.runtime.ops import MARKER_ARGS

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MARKER_TARGETS = (torch.ops.lukv.cache_marker, torch.ops.lukv.cache_marker.default)
EXPAND_METHODS = {"expand", "reshape", "view", "contiguous"}
REPEAT_KV_INDEX = (slice(None), slice(None), None, slice(None), slice(None))  # x[:, :, None, :, :]
SDPA_KEY, SDPA_VALUE = 1, 2


class UnsupportedAttention(RuntimeError):
    """A cache-backed attention the lukv pass cannot rewrite exactly (raised at compile time)."""


@dataclass(frozen=True)
class Marker:
    """A `lukv::cache_marker` call, its arguments read by name (the schema in runtime/ops.py)."""

    node: fx.Node

    def arg(self, name: str):
        named = dict(zip(MARKER_ARGS, self.node.args, strict=False))
        return named[name] if name in named else self.node.kwargs[name]

    @property
    def layer_idx(self) -> int:
        return self.arg("layer_idx")


@dataclass
class AttentionSite:
    sdpa: fx.Node
    marker: Marker | None  # None: not cache-backed (left exact)
    chain: tuple[fx.Node, ...] = ()  # nodes between the marker and SDPA, erased by the rewrite
    size_reads: tuple[tuple[fx.Node, fx.Node], ...] = ()  # (size() of a marker output, the marker input)

    @property
    def query(self) -> fx.Node:
        return self.sdpa.args[0]

    @property
    def module_path(self) -> str:
        stack = self.sdpa.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else self.sdpa.name


def is_call(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def sdpa_arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def softmax_scale(sdpa: fx.Node) -> float:
    """The scale an SDPA call applies: its `scale`, else 1/sqrt(head_dim) of its query."""
    scale = sdpa_arg(sdpa, 6, "scale")
    return float(scale) if scale is not None else 1.0 / math.sqrt(sdpa.args[0].meta["example_value"].shape[-1])


def is_expansion_step(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in EXPAND_METHODS:
        return True
    if is_call(node, (torch.reshape,)):
        return True
    return is_call(node, (operator.getitem,)) and node.args[1] == REPEAT_KV_INDEX


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}{tuple(a if not isinstance(a, fx.Node) else a.name for a in node.args)}"


def is_size_read(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size"


def follow_to_sdpa(start: fx.Node, slot: int, layer_idx: int) -> tuple[fx.Node, list[fx.Node]]:
    """From a marker output, walk the only allowed path to the SDPA that reads it as key/value."""
    chain, node = [], start
    while True:
        users = [u for u in node.users if not (node is start and is_size_read(u))]
        if len(users) != 1:
            uses = ", ".join(describe(u) for u in users) or "nothing"
            raise UnsupportedAttention(f"lukv: the cache's {'keys' if slot == SDPA_KEY else 'values'} of layer "
                                       f"{layer_idx} are used by {uses}; they may only feed one "
                                       "scaled_dot_product_attention")
        user = users[0]
        if user.op == "output":
            raise UnsupportedAttention(f"lukv: layer {layer_idx}'s cached K/V leave the compiled graph before "
                                       "attention: a graph break between cache.update() and attention "
                                       "(TORCH_LOGS=graph_breaks says where); the two must be in one graph")
        if is_call(user, SDPA_TARGETS):
            if sdpa_arg(user, slot, "key" if slot == SDPA_KEY else "value") is not node:
                raise UnsupportedAttention(f"lukv: layer {layer_idx}'s cache output reaches attention in the wrong "
                                           f"argument ({describe(user)})")
            return user, chain
        if not is_expansion_step(user) or user.args[0] is not node:
            raise UnsupportedAttention(f"lukv: layer {layer_idx}'s cached K/V go through {describe(user)} before "
                                       "attention; only transformers' repeat_kv expansion is understood, so this "
                                       "attention cannot be served from a compressed cache")
        chain.append(user)
        node = user


def marker_outputs(marker: fx.Node) -> dict[int, fx.Node]:
    outputs = {}
    for user in marker.users:
        if not is_call(user, (operator.getitem,)) or user.args[1] not in (0, 1):
            raise UnsupportedAttention(f"lukv: a cache marker is used as a whole by {describe(user)}")
        outputs[user.args[1]] = user
    return outputs


def unsupported_reason(sdpa: fx.Node) -> str:
    dropout = sdpa_arg(sdpa, 4, "dropout_p", 0.0)
    if dropout not in (0, 0.0):
        return f"dropout_p={dropout} (eviction is for inference: call model.eval())"
    q = sdpa.args[0].meta.get("example_value")
    if q is None or q.dim() != 4:
        return "its query is not a 4-D [batch, heads, tokens, head_dim] tensor"
    return ""


def match_marker(node: fx.Node) -> AttentionSite:
    marker = Marker(node)
    outputs = marker_outputs(node)
    if set(outputs) != {0, 1}:
        raise UnsupportedAttention(f"lukv: layer {marker.layer_idx}'s cache returns K and V but only "
                                   f"{'K' if 0 in outputs else 'V' if 1 in outputs else 'neither'} is used")
    k_sdpa, k_chain = follow_to_sdpa(outputs[0], SDPA_KEY, marker.layer_idx)
    v_sdpa, v_chain = follow_to_sdpa(outputs[1], SDPA_VALUE, marker.layer_idx)
    if k_sdpa is not v_sdpa:
        raise UnsupportedAttention(f"lukv: layer {marker.layer_idx}'s K and V feed different attention calls")
    reason = unsupported_reason(k_sdpa)
    if reason:
        raise UnsupportedAttention(f"lukv: cannot rewrite attention of layer {marker.layer_idx}: {reason}")
    size_reads = tuple((user, marker.arg(name)) for slot, name in ((0, "k"), (1, "v"))
                       for user in outputs[slot].users if is_size_read(user))
    return AttentionSite(k_sdpa, marker, (outputs[0], outputs[1], *k_chain, *v_chain), size_reads)


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every SDPA in the graph, with its cache marker (None if its K/V do not come from a LUKVCache)."""
    sites = [match_marker(node) for node in graph.nodes if is_call(node, MARKER_TARGETS)]
    served = {site.sdpa for site in sites}
    sites += [AttentionSite(node, None) for node in graph.nodes if is_call(node, SDPA_TARGETS) and node not in served]
    return sites
