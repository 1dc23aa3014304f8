"""LUKVCache: a transformers `Cache` whose layers hold each KV head's kept tokens and nothing else.

A compressible layer is a `RaggedLayer`. Inside a compiled forward its `update()` only returns a
`lukv::cache_marker`; the backend turns each marked attention into one `lukv::attend` op, which calls
back into the layer (`RaggedLayer.attend`) with the chunk's queries, keys and values. The layer's
storage (storage.py), its counters and the settings live here, outside the graph, so:
  - nothing needs sizing up front (no `prepare()`): storage grows as tokens arrive;
  - the model reads the sequence length as a host int (`get_seq_length`), never as a tensor an op mutates;
  - scorer, budgets, compression and eviction points are read at run time: changing them never recompiles.

Sliding-window layers (Gemma 3, Mistral/Phi-3 configs with `sliding_window`) are not compressed: they
use transformers' own `DynamicSlidingWindowLayer`, which is exact and already bounded.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from lukv_compile import handles
from lukv_compile.budgets import keep_counts
from lukv_compile.eviction import Candidates, evict, real_queries
from lukv_compile.kernels import ops  # noqa: F401  (registers the lukv:: ops)
from lukv_compile.kernels.reference import segment_attention
from lukv_compile.profile import DEFAULT_SINK, DEFAULT_WINDOW, RECONSTRUCTION, Profile, ProfileError
from lukv_compile.scorers import layer_ropes
from lukv_compile.settings import LUKVSettings
from lukv_compile.storage import RaggedStore

log = logging.getLogger("lukv_compile")
_reported: set[str] = set()
DECODE_SLACK = 64  # evict="always": a head is compressed back to its budget once it holds this many more tokens


def report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


class LUKVCacheError(RuntimeError):
    """The cache was used in a way it cannot serve (raised before anything is changed)."""


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
    index = torch.arange(chunk, device=allowed.device)
    real = index[None, :] >= torch.as_tensor(chunk - counts, device=allowed.device)[:, None]  # [B, C]
    expected = (index[None, :] <= index[:, None])[None] & real[:, None, :]
    if not torch.equal(allowed, expected[:, None].expand_as(allowed)):
        raise LUKVCacheError(f"lukv: layer {layer_idx} got an attention mask that is not causal with left padding "
                             "(a custom mask, or padding on the right); LU-KV cannot serve it from a compressed "
                             "cache")
    return counts


class RaggedLayer(CacheLayerMixin):
    """One compressible layer: ragged per-head storage plus the sequence counters (see module docstring)."""

    is_compileable = False  # keeps generate from auto-compiling its own way
    is_sliding = False

    def __init__(self, cache: LUKVCache, layer_idx: int):
        super().__init__()
        self.settings, self.profile, self.checked_masks = cache.settings, cache.profile, cache.checked_masks
        self.handle, self.layer_idx = cache.handle, layer_idx
        self.chunk_masks = False  # set while a prepared call runs (LUKVCache.masks_over_chunk)
        self.rope = cache.ropes[layer_idx]  # what scorers that need RoPE (expected_attention) read
        self.store: RaggedStore | None = None
        self.seen = 0  # positions consumed, padding included: the next token's position
        self.real_tokens = np.zeros(0, dtype=np.int64)  # [B] real tokens each row has had (its context length)
        self.evict_every_chunk = False  # set during a chunked prefill (prefill.py)
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
        # and the mask keeps telling us the chunk's padding. Over the chunk's own columns when hooks.py cut
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
        return keep_counts(self.profile, self.settings.compression, real_tokens, protected)[:, self.layer_idx]

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
            if budget is not None:
                self.evict_to(budget, Candidates.from_chunk(k, v, counts, first), q, counts, scale)
            else:
                store.append(k, v, counts, first)
        else:
            store.append(k, v, counts, first)
            out = self.attend_stored(q, counts, scale)
            budget = self.due_budget(False, c, store.length, real_tokens)
            if budget is not None:
                self.evict_to(budget, Candidates.from_store(store), q, counts, scale)
        self.seen, self.real_tokens = first + c, real_tokens
        return out.contiguous()

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
        store = self.store
        if q.is_cuda and q.shape[2] == 1:
            from lukv_compile.kernels.triton_decode import triton_decode_attention

            return triton_decode_attention(q, store.keys, store.values, *store.device_metadata(), scale)
        return segment_attention(q, store.keys, store.values, store.start, store.length, counts, scale)

    # ---- inspection

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Per batch row and KV head, the original positions of the tokens it holds."""
        if self.store is None:
            return []
        return [[self.store.head_positions(b, h) for h in range(self.store.heads)] for b in range(self.store.batch)]

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()


def layer_kinds(config) -> list[str]:
    """'ragged' for layers LU-KV compresses, 'sliding' for sliding-window layers it leaves exact.

    With `layer_types`, its sliding layers; without, every layer slides when `sliding_window` is set
    (Mistral, Phi-3: their masks slide on every layer). Other layer types are refused.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding" if sliding else "ragged"] * config.num_hidden_layers
    kinds = {"full_attention": "ragged", "sliding_attention": "sliding"}
    unknown = sorted({t for t in layer_types if t not in kinds})
    if unknown:
        raise ValueError(f"LUKVCache does not support layer type(s) {', '.join(unknown)}; it serves "
                         f"{', '.join(kinds)}")
    return [kinds[t] for t in layer_types]


def sliding_layers(config) -> list[int]:
    """Layers LU-KV leaves exact (`layer_kinds` 'sliding'): the profiler gives them no budget."""
    return [i for i, kind in enumerate(layer_kinds(text_config(config))) if kind == "sliding"]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class LUKVCache(Cache):
    """KV cache with LU-KV per-head budgets and real ragged storage.

    Args:
        config: the model's config.
        settings: a `LUKVSettings`; or give its fields as keywords (profile, compression, scorer, sink,
            window, policy, evict, allow_other_model), validated the same way as the backend's options.

    `profile` None means uniform budgets for `scorer` (default snapkv). A profile made for another model
    (shape, or config fingerprint when the profile records one) is refused unless `allow_other_model=True`.
    """

    def __init__(self, config, settings: LUKVSettings | None = None, **kwargs):
        if settings is not None and kwargs:
            raise ValueError(f"give LUKVCache either settings= or keyword options, not both ({', '.join(kwargs)})")
        settings = settings if settings is not None else LUKVSettings(**kwargs)
        config = text_config(config)
        self.settings = settings
        self.kinds = layer_kinds(config)
        if "ragged" not in self.kinds:
            raise ValueError(f"every layer of this {getattr(config, 'model_type', 'model')} uses sliding-window "
                             f"attention (sliding_window={config.sliding_window}), which LU-KV leaves exact: there is "
                             "nothing to compress. If the model attends to its whole context in practice (contexts "
                             "shorter than the window), set config.sliding_window = None")
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.checked_masks: dict = {}  # the mask of the forward in progress, checked (RaggedLayer.real_counts)
        # Sliding layers need masks at true offsets (their window); without them masks can cover the chunk.
        self.can_mask_chunks = "sliding" not in self.kinds
        self.chunk_masks = False
        self.profile = resolve_profile(settings, config, len(self.kinds), self.num_kv_heads)
        if self.profile.scorer == RECONSTRUCTION and (settings.evict != "prompt" or settings.prefill_chunk):
            raise ValueError(f"evict={settings.evict!r} / prefill_chunk={settings.prefill_chunk!r} evict after the "
                             f"prompt, but {FILL_BY_RECONSTRUCTION}; keep evict='prompt' and no prefill_chunk")
        self.ropes = layer_ropes(config)  # once per cache: each layer's RoPE frequencies, for the scorers
        self.handle = handles.new_handle(self)
        layers = [RaggedLayer(self, i) if kind == "ragged" else DynamicSlidingWindowLayer(config.sliding_window)
                  for i, kind in enumerate(self.kinds)]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.can_mask_chunks:
            # Every layer is ragged: the marker straight away, without indexing `layers` (indexing a list
            # pins layer_idx in a graph; regional compilation shares one graph across layers, regional.py).
            return torch.ops.lukv.cache_marker(key_states, value_states, self.handle, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0 if self.chunk_masks else super().get_query_offset(layer_idx)

    @contextlib.contextmanager
    def masks_over_chunk(self):
        """Within this block transformers builds masks over the new chunk's columns alone (query and kv
        offset 0), for inputs hooks.prepare_chunk cut to them. Only for caches that `can_mask_chunks`."""
        self.set_chunk_masks(True)
        try:
            yield
        finally:
            self.set_chunk_masks(False)

    def set_chunk_masks(self, on: bool) -> None:
        self.chunk_masks = on
        for layer in self.layers:
            layer.chunk_masks = on

    def nbytes(self) -> int:
        """Bytes held by the cache: keys, values and metadata of every layer."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def reset(self) -> None:
        self.checked_masks.clear()
        for layer in self.layers:
            layer.reset()

    @contextlib.contextmanager
    def evicting_every_chunk(self):
        """Within this block every forward evicts each head back to its budget (chunked prefill)."""
        ragged = [layer for layer in self.layers if isinstance(layer, RaggedLayer)]
        for layer in ragged:
            layer.evict_every_chunk = True
        try:
            yield
        finally:
            for layer in ragged:
                layer.evict_every_chunk = False


def resolve_profile(settings: LUKVSettings, config, num_layers: int, num_kv_heads: int) -> Profile:
    """The profile the settings name (uniform when none), checked against the model and the settings."""
    from lukv_compile.models import config_fingerprint

    profile = settings.profile
    if profile is None:
        scorer = settings.scorer or "snapkv"
        window = DEFAULT_WINDOW[scorer] if settings.window is None else settings.window
        sink = DEFAULT_SINK if settings.sink is None else settings.sink
        return Profile.uniform(num_layers, num_kv_heads, scorer=scorer, sink=sink, window=window)
    asked = {"scorer": settings.scorer, "sink": settings.sink, "window": settings.window}
    made = {"scorer": profile.scorer, "sink": profile.sink, "window": profile.window}
    clash = {k: (asked[k], made[k]) for k in asked if asked[k] is not None and asked[k] != made[k]}
    if clash:
        detail = ", ".join(f"{k}={a!r} but the profile was made with {m!r}" for k, (a, m) in clash.items())
        raise ValueError(f"settings do not match the profile: {detail}")
    fingerprint = "" if settings.allow_other_model else config_fingerprint(config)
    try:
        profile.check_model(num_layers, num_kv_heads, fingerprint)
    except ProfileError as e:
        raise ProfileError(f"{e}; pass allow_other_model=True to use it anyway") from None
    # A layer the profile gave no budget must be one this cache leaves exact, or it would go uncompressed.
    compressed = sorted(set(profile.excluded_layers) - set(sliding_layers(config)))
    if compressed:
        raise ProfileError(f"profile left layers {compressed} out of its budget (sliding-window when profiled), "
                           "but this model compresses them")
    return profile


def full_cache_nbytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of transformers' uncompressed cache holding `tokens` positions, for ratios.

    Every KV head of every layer; sliding-window layers hold at most their window, as transformers'
    own caches do.
    """
    config = text_config(config)
    window = getattr(config, "sliding_window", None) or tokens
    held = sum(min(tokens, window) if kind == "sliding" else tokens for kind in layer_kinds(config))
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * config.num_key_value_heads * held * head_dim_of(config) * element
