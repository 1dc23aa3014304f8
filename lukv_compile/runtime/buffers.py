"""Models that keep their own dense KV buffers (gpt-fast, torchtune): what the `lukv::attend_at` op checks and frees.

Such a model writes a chunk's K/V into `[B, H_kv, S_max, D]` buffers at `positions` and attends over the buffer
under a mask (or over a prefix slice of it). The FX pass (passes/find_buffer_attention.py) replaces the write
and the attention with one `attend_at` op; at run time that op
  - frees the dense buffers' memory (their storage is resized to 0 bytes: the model's buffer attributes stay,
    as shells with no memory, so the compiled graph and its guards are unchanged);
  - reads the chunk's positions: they must be consecutive, starting at 0 (a new sequence: the layer is reset)
    or where the layer's sequence left off (the next chunk, decode step or turn), within the buffer;
  - proves the reading causal over the written positions: query i at position p+i sees the buffer's
    positions 0..p+i and nothing else, but for a row's left padding (a mask any other shape would be served
    wrongly, so it raises); the padding becomes the chunk's per-row real-token counts.
Then the layer serves the chunk like any other (RaggedLayer.attend).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from lukv_compile.config import kv_shape, text_config
from lukv_compile.runtime.errors import LUKVCacheError


def release(buffer: torch.Tensor) -> None:
    """Free a dense KV buffer's memory, keeping the tensor: its storage is resized to 0 bytes, its shape and
    strides stay, so the model's graphs and Dynamo's guards are unchanged (the model's own code traces as before).

    The buffer is lukv's from then on: running the model without lukv needs its `setup_caches()` again, and eager
    code must not write it in place (a strided tensor of another size or a zero-stride one would free it too, but
    the model's own write, traced again for every new graph, is then refused by torch).
    """
    storage = buffer.untyped_storage()
    if storage.nbytes():
        storage.resize_(0)


def chunk_start(positions: torch.Tensor, seen: int, capacity: int, layer_idx: int) -> int:
    """The first position of a chunk written at `positions` [C], checked against what the layer holds."""
    chunk = positions.numel()
    start = int(positions.reshape(-1)[0])
    if chunk > 1 and not torch.equal(positions.reshape(-1).cpu(), torch.arange(start, start + chunk)):
        raise LUKVCacheError(f"lukv: layer {layer_idx}'s KV buffer is written at positions "
                             f"{positions.reshape(-1).tolist()[:8]}...; only consecutive positions are served")
    if start not in (0, seen):
        raise LUKVCacheError(f"lukv: layer {layer_idx}'s KV buffer is written at position {start}, but its "
                             f"sequence holds positions 0..{seen - 1}: a chunk must start at 0 (a new sequence) "
                             f"or at {seen} (the next one); a compressed cache cannot rewrite its past")
    if start + chunk > capacity:
        raise LUKVCacheError(f"lukv: layer {layer_idx} writes positions up to {start + chunk - 1}, past its KV "
                             f"buffer's {capacity} (the model's max_seq_length)")
    return start


def padding_of_read(attn_mask: torch.Tensor | None, is_causal: bool, kv_end: int, start: int, chunk: int,
                    capacity: int, batch: int, pads: np.ndarray | None, layer_idx: int) -> np.ndarray:
    """The left padding [B] of each row (padding slots at the start of its sequence), proving on the way that
    every real query i of the chunk (position start + i) reads exactly the buffer positions pads..start+i.

    `kv_end` >= 0: attention reads the prefix [:kv_end] with no mask (SDPA's is_causal aligns top-left);
    else the whole buffer under `attn_mask` (bool, or additive float), broadcast to [B, heads, C, S_max].
    `pads`: what the sequence's earlier chunks had (None for a new sequence: read off the mask's last query).
    Queries on padding slots may read anything (torchtune lets them read themselves): their output is unused.
    """
    where = f"lukv: layer {layer_idx}'s attention over its KV buffer"
    if kv_end >= 0:
        causal_prefix = is_causal and start == 0 and kv_end == chunk
        one_token = not is_causal and chunk == 1 and kv_end == start + 1
        if not (causal_prefix or one_token):
            raise LUKVCacheError(f"{where} reads positions [0, {kv_end}) with is_causal={is_causal} for {chunk} "
                                 f"new token(s) at position {start}: not causal over the written positions "
                                 f"(expected [0, {start + chunk}), causal when more than one token)")
        return np.zeros(batch, dtype=np.int64)
    if attn_mask is None:
        raise LUKVCacheError(f"{where} has no mask: it would read unwritten positions")
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    if allowed.dim() not in (3, 4) or allowed.shape[-2:] != (chunk, capacity):
        raise LUKVCacheError(f"{where} got a mask of shape {tuple(attn_mask.shape)}; expected [..., {chunk}, "
                             f"{capacity}] (the chunk's queries over the buffer)")
    allowed = allowed.reshape(-1 if allowed.dim() == 3 else allowed.shape[0], 1 if allowed.dim() == 3 else
                              allowed.shape[1], chunk, capacity).expand(batch, -1, -1, -1)
    if pads is None:
        pads = start + chunk - allowed[:, 0, -1, :start + chunk].sum(dim=-1).cpu().numpy().astype(np.int64)
        if (pads >= start + chunk).any():
            raise LUKVCacheError(f"{where}: row(s) {np.flatnonzero(pads >= start + chunk).tolist()} of the sequence's "
                                 f"first chunk ({chunk} tokens) are all padding; left padding must end within the "
                                 "first chunk")
    device = allowed.device
    keys = torch.arange(capacity, device=device)
    queries = torch.arange(start, start + chunk, device=device)
    first = torch.as_tensor(pads, device=device)[:, None, None]  # [B, 1, 1]
    expected = (keys[None, None, :] <= queries[None, :, None]) & (keys[None, None, :] >= first)  # [B, C, S]
    real = (queries[None, :] >= first[:, :, 0])[:, None, :, None]  # [B, 1, C, 1]: queries on real tokens
    if ((allowed != expected[:, None]) & real).any():
        raise LUKVCacheError(f"{where} got a mask that is not causal over the written positions with left "
                             "padding (a custom, sliding-window or right-padding mask); LU-KV cannot serve it from a "
                             "compressed cache")
    return pads


def buffer_model_config(module: torch.nn.Module | None, layers: int, q_heads: int, kv_heads: int, head_dim: int):
    """The config a LUKVCache for a buffer model is built from: the module's own transformers config when it
    has one of this KV shape (profiles are then matched by its fingerprint), else one naming the shape alone."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        if kv_shape(text_config(config)) == (layers, kv_heads, head_dim):
            return text_config(config)
    name = type(module).__name__ if module is not None else "function"
    return SimpleNamespace(model_type=name, name_or_path=name, num_hidden_layers=layers, num_attention_heads=q_heads,
                           num_key_value_heads=kv_heads, head_dim=head_dim, hidden_size=q_heads * head_dim)
