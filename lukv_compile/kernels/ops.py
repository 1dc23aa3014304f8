"""The `lukv::` custom ops the rewritten graph calls.

Each op has a fake (shape/stride-exact) implementation for tracing and a per-device kernel: the
vectorised PyTorch reference on CPU, Triton on CUDA (registered in `kernels/cuda.py`). Ops that write
the cache declare it in `mutates_args`, so AOT functionalises them and inductor re-inplaces them.

`cache_marker` is what `LUKVCache` layers return from `update()`: it ties the new K/V to the layer's
storage so the FX pass can find each attention's cache. It has no kernel of its own: every marker is
replaced by the pass, so running one means the lukv backend did not see that attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lukv_compile.kernels import reference


@torch.library.custom_op("lukv::cache_marker", mutates_args=())
def cache_marker(
    k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, positions: Tensor, seg_start: Tensor,
    seg_len: Tensor, seg_cap: Tensor, budget: Tensor, seen: Tensor,
    layer_idx: int, scorer: str, sink: int, window: int, adaptive: bool, room: int,
) -> tuple[Tensor, Tensor]:
    raise RuntimeError(
        f"LUKVCache layer {layer_idx} was used outside the lukv backend: compile the model with "
        "model.compile(backend='lukv', options=...) or torch.compile(model, backend='lukv') "
        "(options={'inner': 'eager'} to debug without inductor)"
    )


@cache_marker.register_fake
def _(k_new, v_new, *args):
    return torch.empty_like(k_new), torch.empty_like(v_new)


@torch.library.custom_op(
    "lukv::evict_prefill",
    mutates_args=("keys", "values", "positions", "seg_start", "seg_len", "seg_cap", "seen"),
)
def evict_prefill(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, keys: Tensor, values: Tensor,
    positions: Tensor, seg_start: Tensor, seg_len: Tensor, seg_cap: Tensor,
    budget: Tensor, seen: Tensor, scorer: str, sink: int, window: int, adaptive: bool, room: int, scale: float,
) -> None:
    reference.evict_prefill(q, k, v, attn_mask, keys, values, positions, seg_start, seg_len,
                            seg_cap, budget, seen, scorer, sink, window, adaptive, room, scale)


@evict_prefill.register_fake
def _(*args, **kwargs):
    return None


@torch.library.custom_op("lukv::append_kv", mutates_args=("keys", "values", "positions", "seg_len", "seen"))
def append_kv(
    k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, positions: Tensor, seg_start: Tensor,
    seg_len: Tensor, seg_cap: Tensor, seen: Tensor,
) -> None:
    reference.check_room(seg_len, seg_cap)
    reference.append_kv(k_new, v_new, keys, values, positions, seg_start, seg_len, seg_cap, seen)


@append_kv.register_fake
def _(*args, **kwargs):
    return None


@torch.library.custom_op("lukv::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, seg_start: Tensor, seg_len: Tensor,
    scale: float,
) -> Tensor:
    return reference.decode_attention(q, keys, values, seg_start, seg_len, scale)


@decode_attention.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


if torch.cuda.is_available():
    import lukv_compile.kernels.cuda  # noqa: E402,F401  (Triton kernels for the lukv:: ops on CUDA)
