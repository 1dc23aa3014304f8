"""LUKVCache: a transformers `Cache` whose layers hold each KV head's kept tokens and nothing else.

A compressible layer is a `RaggedLayer` (layer.py). The storage (storage.py), the counters and the settings
live outside the graph, so:
  - nothing needs sizing up front (no `prepare()`): storage grows as tokens arrive;
  - the model reads the sequence length as a host int (`get_seq_length`), never as a tensor an op mutates;
  - scorer, budgets, compression and eviction points are read at run time: changing them never recompiles.

Sliding-window layers (Gemma 3, Mistral/Phi-3 configs with `sliding_window`) are not compressed: they
use transformers' own `DynamicSlidingWindowLayer`, which is exact and already bounded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from lukv_compile.config import (
    config_fingerprint,
    head_dim_of,
    kv_shape,
    layer_kinds,
    sliding_layers,
    text_config,
    weights_fingerprint,
)
from lukv_compile.policy.scorers import REGISTRY, layer_ropes
from lukv_compile.profile import RECONSTRUCTION, Profile, ProfileError
from lukv_compile.runtime import registry
from lukv_compile.runtime.default_profile import default_profile, uniform_profile
from lukv_compile.runtime.errors import LUKVCacheError
from lukv_compile.runtime.layer import FILL_BY_RECONSTRUCTION, RaggedLayer
from lukv_compile.runtime.sharding import HeadShard, kv_head_shard, report_balance
from lukv_compile.settings import UNIFORM, LUKVSettings


class LUKVCache(Cache):
    """KV cache with LU-KV per-head budgets and real ragged storage.

    Args:
        config: the model's config.
        settings: a `LUKVSettings`; or give its fields as keywords (profile, compression, scorer, sink,
            window, policy, evict, allow_other_model), validated the same way as the backend's options.

    `profile` None means the model's own LU-KV profile, found by config fingerprint (lukv_compile/profiles), else
    uniform budgets for `scorer` (default snapkv) with a warning; "uniform" asks for uniform budgets. A profile made
    for another model (shape, or config fingerprint when the profile records one) is refused unless
    `allow_other_model=True`.
    """

    def __init__(self, config, settings: LUKVSettings | None = None, **kwargs):
        if settings is not None and kwargs:
            raise ValueError(f"give LUKVCache either settings= or keyword options, not both ({', '.join(kwargs)})")
        settings = settings if settings is not None else LUKVSettings(**kwargs)
        config = text_config(config)
        self.config, self.settings = config, settings
        self.kinds = layer_kinds(config)
        if "ragged" not in self.kinds:
            raise ValueError(f"every layer of this {getattr(config, 'model_type', 'model')} uses sliding-window "
                             f"attention (sliding_window={config.sliding_window}), which LU-KV leaves exact: there is "
                             "nothing to compress. If the model attends to its whole context in practice (contexts "
                             "shorter than the window), set config.sliding_window = None")
        self.shape = kv_shape(config)  # (layers, KV heads, head_dim): what a model must have to use this cache
        self.checked_config = None  # the last model config check_model passed
        self.model = None  # weakref to the model this cache last served (meet_model)
        self.weights = ""  # weights fingerprint of the model that made a loaded cache's K/V ("" = not loaded)
        self.token_ids: torch.Tensor | None = None  # the tokens a loaded cache has seen, when the file has them
        self.shard: HeadShard | None = None  # this process's KV heads under tensor parallelism (take_shard)
        self.num_kv_heads, self.head_dim = self.shape[1:]
        self.warned: set[str] = set()  # what this cache has said once (RaggedLayer.warn_if_kept_whole)
        self.checked_masks: dict = {}  # the mask of the forward in progress, checked (RaggedLayer.real_counts)
        self.checked_reads: dict = {}  # a buffer model's read of the forward in progress (RaggedLayer.attend_at)
        # Sliding layers need masks at true offsets (their window); without them masks can cover the chunk.
        self.can_mask_chunks = "sliding" not in self.kinds
        self.chunk_masks = False
        self.profile = resolve_profile(settings, config, len(self.kinds), self.num_kv_heads)
        if self.profile.scorer == RECONSTRUCTION and (settings.evict != "prompt" or settings.prefill_chunk):
            raise ValueError(f"evict={settings.evict!r} / prefill_chunk={settings.prefill_chunk!r} evict after the "
                             f"prompt, but {FILL_BY_RECONSTRUCTION}; keep evict='prompt' and no prefill_chunk")
        self.ropes = layer_ropes(config)  # once per cache: each layer's RoPE frequencies, for the scorers
        scorer = REGISTRY.get(self.profile.scorer)
        if scorer is not None and scorer.needs_rope and any(r is None for r in self.ropes):
            raise ValueError(f"scorer {scorer.name!r} needs the model's RoPE frequencies, but its config has no "
                             "rope_parameters (a plain module without a transformers config): use another scorer")
        self.handle = registry.new_handle(self)
        layers = [RaggedLayer(self, i) if kind == "ragged" else DynamicSlidingWindowLayer(config.sliding_window)
                  for i, kind in enumerate(self.kinds)]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.can_mask_chunks:
            # Every layer is ragged: the marker straight away, without indexing `layers` (indexing a list
            # pins layer_idx in a graph; regional compilation shares one graph across layers, regional.py).
            return torch.ops.lukv.cache_marker(key_states, value_states, self.handle, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_model(self, config) -> None:
        """Raise, before any work, when the model this cache meets has another KV shape than it was built for."""
        if config is self.checked_config:
            return  # once per model config: this runs before every compiled call, decode steps included
        theirs = kv_shape(config)
        if theirs != self.shape:
            raise LUKVCacheError(f"this LUKVCache was built for a model with {describe_shape(self.shape)}, but it is "
                                 f"used with a model with {describe_shape(theirs)}; build the cache from this model's "
                                 "config: LUKVCache(model.config, ...)")
        self.checked_config = config

    def meet_model(self, model: torch.nn.Module) -> None:
        """Remember the model this cache serves (what `save` records) and refuse, before any work, a model whose
        weights differ from those that made a loaded cache's K/V."""
        if self.model is not None and self.model() is model:
            return  # once per model: this runs before every compiled call
        theirs = weights_fingerprint(model) if self.weights and not self.settings.allow_other_model else ""
        if theirs != self.weights and theirs:
            raise LUKVCacheError(f"this LUKVCache was saved from a model with weights fingerprint {self.weights[:12]}"
                                 f"..., but is used with a model whose weights differ ({theirs[:12]}...): its keys "
                                 "and values would be wrong for this model. Load it with allow_other_model=True to "
                                 "use it anyway")
        self.model = weakref.ref(model)
        self.take_shard(kv_head_shard(model, self.shape[1], self.head_dim))

    def take_shard(self, shard: HeadShard | None) -> None:
        """Hold only the KV heads this process computes under tensor parallelism (runtime/sharding.py)."""
        if shard == self.shard:
            return
        if any(isinstance(layer, RaggedLayer) and layer.store is not None for layer in self.layers):
            raise LUKVCacheError("this LUKVCache holds tokens for other KV heads than this tensor-parallel model's "
                                 "rank computes: build a new cache for it")
        if shard is not None and self.settings.policy == "adakv":
            raise ValueError("lukv option policy='adakv' splits each layer's budget across all its heads at run "
                             "time, which no rank of a tensor-parallel model sees; use policy='lukv'")
        self.shard = shard
        self.num_kv_heads = self.shape[1] if shard is None else shard.stop - shard.start
        if self.settings.profile is None and self.profile.scope != "uniform":  # found: the one for this many shards
            same_ranking = dataclasses.replace(self.settings, scorer=self.profile.scorer)
            self.profile = resolve_profile(same_ranking, self.config, *self.shape[:2], shard.ranks if shard else 1)
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                layer.kv_heads, layer.heads = self.num_kv_heads, slice(None) if shard is None else shard.heads
                layer.profile = self.profile
        if shard is not None:
            report_balance(self.profile, self.settings.compression, shard)

    def save(self, path: str | Path, token_ids: torch.Tensor | None = None) -> None:
        """Write the kept K/V, positions, counters, policy and model identity to `path` (safetensors).

        token_ids [B, T >= seen]: the sequences so far (generate's output: the tokens this cache has seen, then
        the last generated one, not yet fed); a later `generate` takes them before the new tokens, and
        `LUKVCache.load` gives them back as `cache.token_ids`. runtime/saved.py has the format.
        """
        from lukv_compile.runtime.saved import save_cache

        save_cache(self, Path(path), token_ids)

    @classmethod
    def load(cls, path: str | Path, model, allow_other_model: bool = False,
             device: torch.device | str | None = None) -> LUKVCache:
        """The cache `save` wrote, to continue with `model` (or a model of this config: its weights are then
        checked at its first forward). A file saved from another model (config or weights) is refused unless
        `allow_other_model`; a corrupt or truncated file is refused, naming what is wrong."""
        from lukv_compile.runtime.saved import load_cache

        return load_cache(cls, Path(path), model, allow_other_model, device)

    @property
    def batch_size(self) -> int | None:
        """Rows (sequences) this cache holds, None when empty."""
        stores = [layer.store for layer in self.layers if isinstance(layer, RaggedLayer) and layer.store is not None]
        return stores[0].batch if stores else None

    def fork(self, batch: int | None = None) -> LUKVCache:
        """An independent cache that continues from this one's state; both share the K/V held now.

        batch None: the fork has this cache's rows. batch N: this cache holds one sequence and each of the
        fork's N rows continues from it (N questions over one document in one batched generate:
        `lukv_compile.questions_batch`). The shared K/V are stored once and never copied by appending
        (questions, answers): N forks of a document hold one document plus N suffixes. A fork that evicts
        again (evict='turn' / 'always') first takes its own copy of what it keeps.
        """
        held = self.batch_size
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise ValueError(f"fork batch must be an int >= 1 or None, got {batch!r}")
        if batch is not None and held not in (None, 1):
            raise ValueError(f"fork(batch={batch}) continues one sequence in every row, but this cache holds {held}; "
                             "fork() without batch keeps its rows")
        rows = np.zeros(batch, dtype=np.int64) if batch is not None else np.arange(held or 0)
        fork = LUKVCache(self.config, self.settings)
        fork.model, fork.weights = self.model, self.weights
        fork.take_shard(self.shard)
        fork.token_ids = None if self.token_ids is None else self.token_ids[torch.as_tensor(rows)]
        for i, mine in enumerate(self.layers):
            if isinstance(mine, RaggedLayer):
                if mine.store is not None:
                    mine.fork_into(fork.layers[i], rows)
            elif mine.keys is not None and mine.keys.numel():
                fork.layers[i] = copied_rows(mine, rows)
        return fork

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
        """Bytes held by the cache: keys, values and metadata of every layer (K/V it shares with forks too)."""
        return nbytes_together([self])

    def tensors(self) -> list[torch.Tensor]:
        """Every K/V tensor the cache keeps alive, shared ones included."""
        found = []
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                found += layer.store.tensors() if layer.store is not None else []
            elif getattr(layer, "keys", None) is not None:
                found += [layer.keys, layer.values]
        return found

    def reset(self) -> None:
        self.checked_masks.clear()
        self.checked_reads.clear()
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


def nbytes_together(caches: list[LUKVCache]) -> int:
    """Bytes `caches` hold together, each tensor counted once: forks of one cache share their past's K/V."""
    tensors = {id(t): t for cache in caches for t in cache.tensors()}
    metadata = sum(layer.store.metadata_nbytes() for cache in caches for layer in cache.layers
                   if isinstance(layer, RaggedLayer) and layer.store is not None)
    return sum(t.numel() * t.element_size() for t in tensors.values()) + metadata


def copied_rows(layer: DynamicSlidingWindowLayer, rows: np.ndarray) -> DynamicSlidingWindowLayer:
    """A sliding-window layer holding copies of `layer`'s rows `rows` (bounded by the window: no sharing)."""
    fork = copy.copy(layer)
    index = torch.as_tensor(rows, device=layer.keys.device)
    fork.keys, fork.values = layer.keys[index], layer.values[index]
    return fork


def describe_shape(shape: tuple[int, int, int]) -> str:
    layers, heads, dim = shape
    return f"{layers} layers, {heads} KV heads, head_dim {dim}"


def resolve_profile(settings: LUKVSettings, config, num_layers: int, num_kv_heads: int, shards: int = 1) -> Profile:
    """The profile the settings name (None: the model's own, solved for `shards` where one is; default_profile.py),
    checked against the model and the settings."""
    profile = settings.profile
    if profile is None:
        profile = default_profile(settings, config, num_layers, num_kv_heads, shards)
    if profile == UNIFORM:
        return uniform_profile(settings, num_layers, num_kv_heads)
    asked = {"scorer": settings.scorer, "sink": settings.sink, "window": settings.window}
    made = {"scorer": profile.scorer, "sink": profile.sink, "window": profile.window}
    clash = {k: (asked[k], made[k]) for k in asked if asked[k] is not None and asked[k] != made[k]}
    if clash:
        detail = ", ".join(f"{k}={a!r} but the profile was made with {m!r}" for k, (a, m) in clash.items())
        raise ValueError(f"settings do not match the profile: {detail}")
    fingerprint = "" if settings.allow_other_model else config_fingerprint(config)
    profile.check_model(num_layers, num_kv_heads, fingerprint)
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
