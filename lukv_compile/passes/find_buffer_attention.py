"""Match every attention that reads a model's own dense KV buffers (gpt-fast, torchtune, litgpt), strictly.

Such a model keeps per-layer buffers `[B, H_kv, S_max, D]` as module state (graph inputs here), writes a
chunk's K/V into them in place along the sequence dimension, and attends over them:

    k_cache[:, :, input_pos] = k          (setitem at a positions tensor or a slice; or index_copy_(2, pos, k))
    k = k_cache                           (the whole buffer, under a mask), or k_cache[:, :, :end] (a prefix)
    k = k.repeat_interleave(g, dim=1)     (GQA, optional: also expand/reshape or enable_gqa=True)
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

A buffer matches when it is written exactly once and read exactly once, by one SDPA's key (its V twin by the
same SDPA's value) through those steps only. The mask must be None (a prefix read), a graph input, or a
slice of one (`causal_mask[None, None, input_pos]`): what it holds is proved causal at run time
(runtime/buffers.py). Any other use of a buffer (a sliding-window slice, a matmul, a second reader) or a mask
computed in the graph is an error naming the buffer and the op, never a silent rewrite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from lukv_compile.passes.find_attention import (
    SDPA_KEY,
    SDPA_TARGETS,
    SDPA_VALUE,
    UnsupportedAttention,
    describe,
    is_call,
    is_expansion_step,
    is_size_read,
    sdpa_arg,
    unsupported_reason,
)

ALL = slice(None)


@dataclass
class BufferSide:
    """One of a layer's two buffers (keys or values): how it is written and read."""

    buffer: fx.Node  # the graph input holding the dense buffer
    write: fx.Node
    new: fx.Node  # the chunk's K (or V) the write stores
    positions: fx.Node | slice  # where it is stored: a positions tensor, or a slice of the sequence dimension
    chain: tuple[fx.Node, ...]  # from the buffer to SDPA: a prefix slice, then GQA expansion steps
    kv_end: object  # the prefix read's end (int or a SymInt node), -1 when the whole buffer is read


@dataclass
class BufferSite:
    sdpa: fx.Node
    keys: BufferSide
    values: BufferSide

    @property
    def query(self) -> fx.Node:
        return self.sdpa.args[0]


def buffer_name(node: fx.Node) -> str:
    """A graph input's module path as Dynamo names it: L_call_self_modules_layers_modules_0_..._buffers_k_cache_
    -> layers.0....k_cache."""
    name = str(node.target).rstrip("_")
    name = name.split("self_", 1)[1] if "self_" in name else name
    for part in ("modules_", "buffers_", "parameters_"):
        name = name.replace(f"_{part}", ".").removeprefix(part)
    return name


# GQA steps beyond transformers' repeat_kv: gpt-fast's k.repeat_interleave(g, dim=1), torchtune's
# k.unsqueeze(2).expand(...).flatten(1, 2). Each only repeats heads; the same call on another dimension is not GQA.
HEAD_STEPS = {"repeat_interleave": lambda n: n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None) == 1,
              "unsqueeze": lambda n: n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None) == 2,
              "flatten": lambda n: tuple(n.args[1:3]) == (1, 2)}


def is_head_step(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in HEAD_STEPS:
        return True
    return is_call(node, (torch.repeat_interleave,))


def source_of(node: fx.Node) -> tuple[fx.Node, list[fx.Node], object] | None:
    """Walk up from SDPA's key/value through GQA expansion and a prefix slice to a graph input, if one is there:
    (the input, the nodes between, the prefix end or -1)."""
    chain, kv_end = [], -1
    while is_expansion_step(node) or is_head_step(node):
        chain.append(node)
        node = node.args[0]
    if is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple) and len(node.args[1]) == 3:
        index = node.args[1]
        if index[:2] == (ALL, ALL) and isinstance(index[2], slice) and index[2].start in (None, 0) \
                and index[2].step is None and index[2].stop is not None:
            chain.append(node)
            kv_end, node = index[2].stop, node.args[0]
    if node.op != "placeholder" or not _is_kv_buffer(node):
        return None
    return node, chain[::-1], kv_end


def _is_kv_buffer(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()


def check_head_steps(buffer: fx.Node, read: fx.Node, chain: list[fx.Node], kv_end, name: str) -> None:
    """The steps between a buffer and SDPA may only repeat its heads: the same batch, positions and head_dim."""
    for node in chain:
        if node.op == "call_method" and node.target in HEAD_STEPS and not HEAD_STEPS[node.target](node):
            raise UnsupportedAttention(f"lukv: the KV buffer {name} goes through {describe(node)} before attention; "
                                       "only a repetition of its heads (dim 1) is understood")
    b, h, s, d = buffer.meta["example_value"].shape
    got = read.meta["example_value"].shape
    same_positions = kv_end != -1 or got[2] == s
    if len(got) != 4 or got[0] != b or got[3] != d or got[1] % h or not same_positions:
        raise UnsupportedAttention(f"lukv: attention reads the KV buffer {name} [{b}, {h}, {s}, {d}] as "
                                   f"{list(got)}: only a repetition of its heads is understood")


def write_of(user: fx.Node) -> tuple[fx.Node, fx.Node | slice] | None:
    """(the stored value, the positions) when `user` writes its buffer along the sequence dimension, else None."""
    if is_call(user, (operator.setitem,)):
        index = user.args[1]
        if isinstance(index, tuple) and len(index) == 3 and index[:2] == (ALL, ALL):
            return user.args[2], index[2]
        return None
    if user.op == "call_method" and user.target == "index_copy_" and user.args[1] == 2 and len(user.args) == 4:
        return user.args[3], user.args[2]
    return None


def buffer_side(sdpa: fx.Node, slot: int, order: dict[fx.Node, int]) -> BufferSide | None:
    read = sdpa_arg(sdpa, slot, "key" if slot == SDPA_KEY else "value")
    found = source_of(read)
    if found is None:
        return None
    buffer, chain, kv_end = found
    reader = chain[0] if chain else sdpa
    name = buffer_name(buffer)
    writes, others = [], []
    for user in buffer.users:
        if user is reader or is_size_read(user):
            continue
        (writes if write_of(user) is not None else others).append(user)
    if not writes:
        return None  # an input attention reads, not state the model keeps: not a KV buffer
    if others or len(writes) != 1:
        uses = ", ".join(describe(u) for u in others) or f"{len(writes)} writes"
        raise UnsupportedAttention(f"lukv: the KV buffer {name} is read by attention and also used by {uses}; a "
                                   "buffer served from a compressed cache may only be written once at the step's "
                                   "positions and read by that one attention")
    for node in chain:
        if len(node.users) != 1:
            raise UnsupportedAttention(f"lukv: the KV buffer {name} goes through {describe(node)}, which is used "
                                       f"{len(node.users)} times; only one attention may read it")
    check_head_steps(buffer, read, chain, kv_end, name)
    write = writes[0]
    if order[write] > order[sdpa]:
        raise UnsupportedAttention(f"lukv: the KV buffer {name} is written after the attention reads it")
    new, positions = write_of(write)
    if not isinstance(positions, fx.Node) and not (isinstance(positions, slice) and positions.step is None):
        raise UnsupportedAttention(f"lukv: the KV buffer {name} is written at {positions!r}; only a positions "
                                   "tensor or a slice of the sequence dimension is understood")
    return BufferSide(buffer, write, new, positions, tuple(chain), kv_end)


def check_mask(site: BufferSite, name: str) -> None:
    mask = sdpa_arg(site.sdpa, 3, "attn_mask")
    if site.keys.kv_end != -1:
        if mask is not None:
            raise UnsupportedAttention(f"lukv: attention over a prefix of the KV buffer {name} also has a mask "
                                       f"({describe(mask)}); a prefix read must be the mask")
        return
    if mask is None:
        raise UnsupportedAttention(f"lukv: attention over the whole KV buffer {name} has no mask: it reads "
                                   "positions not written yet")
    source = mask.args[0] if is_call(mask, (operator.getitem,)) else mask
    if source.op != "placeholder":
        raise UnsupportedAttention(f"lukv: the mask of the attention over the KV buffer {name} is computed in "
                                   f"the graph ({describe(mask)}); only a mask the model is given, or a slice of "
                                   "a mask buffer (causal_mask[None, None, input_pos]), can be proved causal")


def same_value(a, b) -> bool:
    """Whether two write positions (or prefix ends) are the same: one node, equal constants, or one expression
    computed twice (torchtune's `self.cache_pos[:seq_len]` for K, then for V)."""
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b:
        return (a.op, a.target, a.kwargs) == (b.op, b.target, b.kwargs) and len(a.args) == len(b.args) and all(
            same_value(x, y) for x, y in zip(a.args, b.args, strict=True))
    if isinstance(a, slice) and isinstance(b, slice):
        return all(same_value(x, y) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return a is b or (not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b)


def match_buffers(sdpa: fx.Node, order: dict[fx.Node, int]) -> BufferSite | None:
    keys, values = buffer_side(sdpa, SDPA_KEY, order), buffer_side(sdpa, SDPA_VALUE, order)
    if keys is None and values is None:
        return None
    side = keys or values
    name = buffer_name(side.buffer)
    if keys is None or values is None:
        raise UnsupportedAttention(f"lukv: attention reads the KV buffer {name} as its "
                                   f"{'keys' if keys else 'values'} but its {'values' if keys else 'keys'} from "
                                   "elsewhere")
    if not same_value(keys.positions, values.positions):
        raise UnsupportedAttention(f"lukv: the K and V buffers {name} / {buffer_name(values.buffer)} are written "
                                   "at different positions")
    if not same_value(keys.kv_end, values.kv_end):
        raise UnsupportedAttention(f"lukv: attention reads different prefixes of {name} and its V buffer")
    reason = unsupported_reason(sdpa)
    if reason:
        raise UnsupportedAttention(f"lukv: cannot rewrite attention over the KV buffer {name}: {reason}")
    site = BufferSite(sdpa, keys, values)
    check_mask(site, name)
    return site


def find_buffer_attention(graph: fx.Graph) -> list[BufferSite]:
    """Every SDPA that reads a model's own KV buffers, in graph order (a layer's index is its place here)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    sites = [match_buffers(node, order) for node in graph.nodes if is_call(node, SDPA_TARGETS)]
    return [site for site in sites if site is not None]
