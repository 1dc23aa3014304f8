"""RaggedLayer: one compressible layer of a LUKVCache, its ragged storage and its counters.

Inside a compiled forward `update()` only returns a `lukv::cache_marker`; the backend turns each marked
attention into one `lukv::attend` op, which calls back into `RaggedLayer.attend` with the chunk's queries,
keys and values. Everything the op changes (storage, counters) lives here, outside the graph.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from lukv_compile.kernels.reference import segment_attention
from lukv_compile.policy.budgets import keep_counts
from lukv_compile.policy.eviction import Candidates, evict, real_queries
from lukv_compile.profile import RECONSTRUCTION
from lukv_compile.runtime import ops  # noqa: F401  (registers the lukv:: ops update() returns)
from lukv_compile.runtime.buffers import chunk_start, padding_of_read, release
from lukv_compile.runtime.errors import LUKVCacheError, LUKVWarning
from lukv_compile.runtime.storage import RaggedStore

DECODE_SLACK = 64  # evict="always": a head is compressed back to its budget once it holds this many more tokens


FILL_BY_RECONSTRUCTION = ("its profile ranks tokens by reconstruction, which no forward computes: fill the cache "
                          "with lukv_compile.compress_context(model, cache, context_ids, repeat_ids(...)) first, "
                          "or use a profile made for a run-time scorer")


def chunk_real_counts(attn_mask: torch.Tensor | None, is_causal: bool, batch: int, chunk: int,
                      layer_idx: int) -> np.ndarray:
    """Real (non-padding) tokens per row of a query chunk, from the attention's own mask.

    Accepts exactly what transformers builds for a cache whose keys are the chunk itself: no mask (every
    token real, causal when chunk > 1), or a [B, 1 | Hq, C, C] mask that is causal and hides left padding.
    Anything else (a custom mask, bidirectional attention, padding on the right) would be served wrongly,
    so it raises.
    """
    if attn_mask is None:
        if chunk > 1 and not is_causal:
            raise LUKVCacheError(f"lukv: layer {layer_idx} got non-causal attention over {chunk} new tokens; "
                                 "only causal attention can be served from a compressed cache")
        return np.full(batch, chunk, dtype=np.int64)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    if allowed.dim() != 4 or allowed.shape[-2:] != (chunk, chunk):
        raise LUKVCacheError(f"lukv: layer {layer_idx} got an attention mask of shape {tuple(attn_mask.shape)}; "
                             f"expected [batch, 1, {chunk}, {chunk}] (causal over the new tokens)")
    allowed = allowed.expand(batch, -1, -1, -1)
    counts = allowed[:, 0, -1, :].sum(dim=-1).cpu().numpy().astype(np.int64)
    if not torch.equal(allowed, left_padded_causal(counts, chunk, allowed.device).expand_as(allowed)):
        raise LUKVCacheError(f"lukv: layer {layer_idx} got an attention mask that is not causal with left padding "
                             "(a custom mask, or padding on the right); LU-KV cannot serve it from a compressed "
                             "cache")
    return counts


def left_padded_causal(counts: np.ndarray, chunk: int, device: torch.device) -> torch.Tensor:
    """The [B, 1, C, C] mask transformers builds for a chunk whose rows hold `counts` [B] real tokens at their end:
    causal, padding hidden (queries on padding see nothing)."""
    index = torch.arange(chunk, device=device)
    real = index[None, :] >= torch.as_tensor(chunk - counts, device=device)[:, None]  # [B, C]
    return ((index[None, :] <= index[:, None])[None] & real[:, None, :])[:, None]


class RaggedLayer(CacheLayerMixin):
    """One compressible layer: ragged per-head storage plus the sequence counters (see module docstring)."""

    is_compileable = False  # keeps generate from auto-compiling its own way
    is_sliding = False

    def __init__(self, cache, layer_idx: int):
        super().__init__()
        self.settings, self.profile, self.checked_masks = cache.settings, cache.profile, cache.checked_masks
        self.checked_reads = cache.checked_reads
        self.kv_heads, self.head_dim, self.warned = cache.num_kv_heads, cache.head_dim, cache.warned
        self.handle, self.layer_idx = cache.handle, layer_idx
        self.heads = slice(None)  # which of the profile's KV heads this layer holds (tensor parallel: a block)
        self.chunk_masks = False  # set while a prepared call runs (LUKVCache.masks_over_chunk)
        self.rope = cache.ropes[layer_idx]  # what scorers that need RoPE (expected_attention) read
        self.store: RaggedStore | None = None
        self.seen = 0  # positions consumed, padding included: the next token's position
        self.real_tokens = np.zeros(0, dtype=np.int64)  # [B] real tokens each row has had (its context length)
        self.evict_every_chunk = False  # set during a chunked prefill (chunked_prefill.py)
        self.is_initialized = True

    # ---- transformers' layer API (traced by Dynamo: no data-dependent code, no errors here)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.ops.lukv.cache_marker(key_states, value_states, self.handle, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention mask covers the new tokens only: what the kept tokens may see is the cache's business,
        # and the mask keeps telling us the chunk's padding. Over the chunk's own columns when compiler/chunks.py cut
        # the inputs to them (never reading `seen`, which Dynamo would guard on), else kv [seen, seen + C).
        return query_length, 0 if self.chunk_masks else self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.seen = None, 0
        self.real_tokens = np.zeros(0, dtype=np.int64)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        rows = beam_idx.cpu().numpy()
        if self.store is not None:
            self.store.select_rows(rows)
        self.real_tokens = self.real_tokens[rows]

    def crop(self, max_length: int) -> None:
        raise LUKVCacheError("LUKVCache cannot drop tokens it has already compressed (assisted / speculative "
                             "decoding rolls the cache back); generate without an assistant model")

    # ---- run time, called by the lukv::attend op

    def budget(self, real_tokens: np.ndarray) -> np.ndarray:
        """Keep counts [B, H] of this layer for contexts of `real_tokens` [B] tokens."""
        protected = self.profile.sink + self.profile.window
        counts = keep_counts(self.profile, self.settings.compression, real_tokens, protected)[:, self.layer_idx]
        return counts[:, self.heads]  # every head's under tensor parallelism too: the budgets of one process

    def due_budget(self, was_empty: bool, chunk: int, length: np.ndarray, real_tokens: np.ndarray) -> np.ndarray | None:
        """The keep counts [B, H] to compress heads holding `length` tokens to after this chunk, or None."""
        when = self.settings.evict
        at_once = was_empty or self.evict_every_chunk or (chunk > 1 and when in ("turn", "always"))
        if not at_once and when != "always":
            return None  # the common decode step: no budget lookup at all
        budget = self.budget(real_tokens)
        over = length - budget
        # Decoding with evict="always": wait until a head is DECODE_SLACK over, so eviction is amortised.
        return budget if (over > 0).any() and (at_once or (over >= DECODE_SLACK).any()) else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool, scale: float) -> torch.Tensor:
        """Attention of a chunk of C new tokens over the kept tokens and the chunk; then evict if due."""
        b, h, c, d = k.shape
        counts = self.real_counts(attn_mask, is_causal, b, c)
        if self.store is None:
            self.check_shape(h, d)
            if self.profile.scorer == RECONSTRUCTION:
                raise LUKVCacheError(f"lukv: layer {self.layer_idx} got a prompt on an empty cache, but "
                                     f"{FILL_BY_RECONSTRUCTION}")
            self.store = RaggedStore(b, h, d, k.dtype, k.device)
            self.real_tokens = np.zeros(b, dtype=np.int64)
        elif self.store.batch != b:
            raise LUKVCacheError(f"lukv: layer {self.layer_idx} holds {self.store.batch} sequences but got a batch of "
                                 f"{b}; call cache.reset() before a new batch")
        store, first = self.store, self.seen
        real_tokens = self.real_tokens + counts
        if store.num_tokens == 0:
            # The prompt: exact attention over it; the budget is kept straight from it (never stored whole).
            causal = is_causal and attn_mask is None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                                 enable_gqa=True)
            budget = self.due_budget(True, c, np.repeat(counts[:, None], h, axis=1), real_tokens)
            self.warn_if_kept_whole(real_tokens)
            if budget is not None:
                self.evict_to(budget, Candidates.from_chunk(k, v, counts, first), q, counts, scale)
            else:
                store.append(k, v, counts, first)
        else:
            store.append(k, v, counts, first)
            out = self.attend_stored(q, counts, scale)
            budget = self.due_budget(False, c, store.held, real_tokens)
            if budget is not None:
                self.evict_to(budget, Candidates.from_store(store), q, counts, scale)
        self.seen, self.real_tokens = first + c, real_tokens
        return out.contiguous()

    def attend_at(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  buffers: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None, is_causal: bool,
                  kv_end: int, scale: float) -> torch.Tensor:
        """`attend` for a chunk a model meant to write into its own dense KV `buffers` at `positions` and read
        back causally (runtime/buffers.py checks that); the buffers' memory is freed."""
        chunk, capacity = k.shape[2], buffers[0].shape[2]
        start = chunk_start(positions, self.seen, capacity, self.layer_idx)
        mask_id = (attn_mask.data_ptr(), tuple(attn_mask.shape)) if attn_mask is not None else None
        key = ("buffer", mask_id, start, chunk, kv_end, is_causal)
        if start == 0 and self.layer_idx == 0:
            self.checked_reads.clear()  # a new sequence: its mask is checked afresh, whatever its address
        if key not in self.checked_reads:  # once per forward: every layer reads the same mask
            batch = k.shape[0]
            known = self.seen - self.real_tokens if start and len(self.real_tokens) == batch else None
            pads = padding_of_read(attn_mask, is_causal, kv_end, start, chunk, capacity, batch, known,
                                   self.layer_idx)
            counts = chunk - np.clip(pads - start, 0, chunk)
            self.checked_reads.clear()
            self.checked_reads[key] = None if (counts == chunk).all() else left_padded_causal(counts, chunk, k.device)
        chunk_mask = self.checked_reads[key]  # None: no padding in this chunk
        for buffer in buffers:
            release(buffer)
        if start == 0 and self.seen:
            self.reset()  # the model starts a new sequence over its buffers
        return self.attend(q, k, v, chunk_mask, chunk > 1, scale)

    def check_shape(self, heads: int, head_dim: int) -> None:
        if (heads, head_dim) != (self.kv_heads, self.head_dim):
            raise LUKVCacheError(f"lukv: layer {self.layer_idx} of this LUKVCache was built for {self.kv_heads} KV "
                                 f"heads of head_dim {self.head_dim} but got keys with {heads} heads of {head_dim}; "
                                 "build the cache from this model's config: LUKVCache(model.config, ...)")

    def warn_if_kept_whole(self, real_tokens: np.ndarray) -> None:
        """Say once per cache when a prompt is too short to compress: every head keeps sink + window tokens."""
        if self.evict_every_chunk:
            return  # a chunked prefill: chunked_prefill() asks once the whole prompt is in
        protected = self.profile.sink + self.profile.window
        short = real_tokens[(real_tokens <= protected) & (real_tokens > 0)]  # 0: a row's chunk of padding alone
        if self.settings.compression > 0 and short.size and "short prompt" not in self.warned:
            self.warned.add("short prompt")
            warnings.warn(f"lukv: a prompt of {int(short.max())} tokens is not longer than sink + window = "
                          f"{protected} (the tokens every head always keeps), so it is kept whole: compression "
                          f"{self.settings.compression} applies from {protected + 1} tokens on (a later turn that "
                          "makes the context longer is compressed with evict='turn')", LUKVWarning, stacklevel=2)

    def evict_to(self, budget: np.ndarray, candidates: Candidates, q: torch.Tensor, counts: np.ndarray,
                 scale: float) -> None:
        p = self.profile
        evict(self.store, candidates, q=q, budget=budget, scorer=p.scorer, sink=p.sink, window=p.window,
              adaptive=self.settings.policy == "adakv", scale=scale, rope=self.rope,
              queries=real_queries(counts, q.shape[2], q.device))

    def real_counts(self, attn_mask: torch.Tensor | None, is_causal: bool, batch: int, chunk: int) -> np.ndarray:
        """`chunk_real_counts`, checked once per forward: every layer of a forward gets the same mask tensor."""
        if attn_mask is None:
            return chunk_real_counts(None, is_causal, batch, chunk, self.layer_idx)
        key = (attn_mask.data_ptr(), tuple(attn_mask.shape), self.seen)  # seen: unique to this forward
        if key not in self.checked_masks:
            self.checked_masks.clear()
            self.checked_masks[key] = chunk_real_counts(attn_mask, is_causal, batch, chunk, self.layer_idx)
        return self.checked_masks[key]

    def attend_stored(self, q: torch.Tensor, counts: np.ndarray, scale: float) -> torch.Tensor:
        store, shared = self.store, self.store.shared()
        if q.is_cuda and q.shape[2] == 1:
            from lukv_compile.kernels.triton_decode import triton_decode_attention

            prefix = None if shared is None else (shared.keys, shared.values, *store.prefix_device_metadata())
            return triton_decode_attention(q, store.keys, store.values, *store.device_metadata(), scale,
                                           prefix=prefix)
        prefix = None if shared is None else (shared.keys, shared.values, shared.start, shared.length)
        return segment_attention(q, store.keys, store.values, store.start, store.length, counts, scale, prefix)

    def fork_into(self, fork: RaggedLayer, rows: np.ndarray) -> None:
        """Make `fork` (a layer of another cache) continue from this filled layer's rows `rows`, sharing its tokens."""
        fork.store = self.store.fork_rows(rows)
        fork.seen, fork.real_tokens = self.seen, self.real_tokens[rows]

    # ---- inspection

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Per batch row and KV head, the original positions of the tokens it holds."""
        if self.store is None:
            return []
        return [[self.store.head_positions(b, h) for h in range(self.store.heads)] for b in range(self.store.batch)]

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()
