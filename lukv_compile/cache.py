"""LUKVCache: a transformers `Cache` whose layers hold each KV head's kept tokens and nothing else.

A compressible layer is a `RaggedLayer`: one flat `[S, D]` key and value tensor holding every
(batch row, KV head) segment back to back, each segment sized to that head's budget plus room for the
decode tokens, with per-head start/length tensors (layout: docs/architecture.md). Shapes are fixed
once the prompt is known, so a compiled decode step never recompiles; appending a token writes one
slot per head. Sliding-window layers (Gemma 3) are not compressed: they use transformers' own
`StaticSlidingWindowLayer`, which is exact and already bounded.

The cache is sized by `prepare()` (generate calls it; hand-written loops call it once per prompt).
Eviction itself happens in the compiled graph: the `lukv` backend rewrites each attention that reads
a `RaggedLayer` into prefill-then-evict / append-then-ragged-attention ops.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticSlidingWindowLayer

from lukv_compile.budgets import POLICIES, keep_counts
from lukv_compile.kernels import ops  # noqa: F401  (registers the lukv:: ops)
from lukv_compile.profile import DEFAULT_SINK, DEFAULT_WINDOW, Profile, check_compression, check_scorer


class RaggedLayer(CacheLayerMixin):
    """One layer's ragged per-head storage (see kernels/reference.py for the tensor contract)."""

    is_compileable = False  # keeps generate from auto-compiling with inductor and 4D-mask building
    is_sliding = False

    def __init__(self, layer_idx: int, scorer: str, sink: int, window: int, adaptive: bool):
        super().__init__()
        self.layer_idx, self.scorer, self.sink, self.window, self.adaptive = layer_idx, scorer, sink, window, adaptive
        self.room = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("LUKVCache is not prepared: call cache.prepare(attention_mask, max_new_tokens) "
                           "before the first forward (generate() does this for you)")

    def allocate(self, budget: np.ndarray, room: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """Size the storage for keep counts `budget` [B, H] plus `room` decode tokens per head."""
        b, h = budget.shape
        cap = torch.as_tensor(budget + room, dtype=torch.int32).flatten()
        slots = int(cap.sum())
        self.keys = torch.zeros(slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(slots, head_dim, dtype=dtype, device=device)
        self.positions = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.seg_start = (cap.cumsum(0) - cap).long().view(b, h).to(device)
        self.seg_len = torch.zeros(b, h, dtype=torch.int32, device=device)
        self.seg_cap = cap.view(b, h).to(device)
        self.budget = torch.as_tensor(budget, dtype=torch.int32, device=device)
        self.seen = torch.zeros(1, dtype=torch.int64, device=device)
        self.room, self.device, self.is_initialized = room, device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return torch.ops.lukv.cache_marker(
            key_states, value_states, self.keys, self.values, self.positions, self.seg_start, self.seg_len,
            self.seg_cap, self.budget, self.seen,
            self.layer_idx, self.scorer, self.sink, self.window, self.adaptive, self.room,
        )

    def get_seq_length(self):
        if not self.is_initialized:
            return 0
        # A tensor while tracing (a Python int would be baked into the graph and recompile every step).
        return self.seen[0] if torch.compiler.is_compiling() else int(self.seen[0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The rewritten ops track lengths themselves; the model's mask is only read at prefill.
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_initialized:
            return []
        return [self.keys, self.values, self.positions, self.seg_start, self.seg_len, self.seg_cap, self.budget,
                self.seen]

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """For inspection and tests: per batch row and KV head, the original positions it holds."""
        b, h = self.seg_len.shape
        return [[self.positions[int(self.seg_start[i, j]):int(self.seg_start[i, j] + self.seg_len[i, j])]
                 for j in range(h)] for i in range(b)]


def layer_kinds(config) -> list[str]:
    """'ragged' for layers LU-KV compresses, 'sliding' for sliding-window layers it leaves exact."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return ["sliding" if kind == "sliding_attention" else "ragged" for kind in layer_types]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LUKVCache(Cache):
    """KV cache with LU-KV per-head budgets and real ragged storage.

    Args:
        config: the model's (text) config.
        profile: a `Profile` (LU-KV solved, or uniform / pyramid); default: uniform for `scorer`.
        compression: fraction of the context's KV entries removed, in [0, 1); 0.8 keeps 20%.
        scorer: token scorer; must match the profile's.
        sink, window: protected first / last tokens; must match the profile's.
        policy: "lukv" (use the profile) or "adakv" (per-layer totals from the profile, split over the
            heads at run time from the scores).
    """

    def __init__(self, config, profile: Profile | None = None, compression: float = 0.8, scorer: str | None = None,
                 sink: int | None = None, window: int | None = None, policy: str = "lukv"):
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.compression = check_compression(compression)
        if policy not in ("lukv", "adakv"):
            raise ValueError(f"LUKVCache policy must be 'lukv' or 'adakv' (other policies are profiles: "
                             f"{', '.join(POLICIES)}), got {policy!r}")
        self.kinds = layer_kinds(config)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.profile = self.resolve_profile(profile, scorer, sink, window)
        self.profile.check_model(len(self.kinds), self.num_kv_heads)
        p = self.profile
        layers = [RaggedLayer(i, p.scorer, p.sink, p.window, policy == "adakv") if kind == "ragged"
                  else StaticSlidingWindowLayer(self.sliding_window, self.sliding_window)
                  for i, kind in enumerate(self.kinds)]
        super().__init__(layers=layers)
        self.policy = policy

    def resolve_profile(self, profile: Profile | None, scorer: str | None, sink: int | None,
                        window: int | None) -> Profile:
        if profile is None:
            scorer = check_scorer(scorer or "snapkv")
            window = DEFAULT_WINDOW[scorer] if window is None else window
            sink = DEFAULT_SINK if sink is None else sink
            return Profile.uniform(len(self.kinds), self.num_kv_heads, scorer=scorer, sink=sink, window=window)
        asked = {"scorer": scorer, "sink": sink, "window": window}
        made = {"scorer": profile.scorer, "sink": profile.sink, "window": profile.window}
        clash = {k: (asked[k], made[k]) for k in asked if asked[k] is not None and asked[k] != made[k]}
        if clash:
            detail = ", ".join(f"{k}={a!r} but the profile was made with {m!r}" for k, (a, m) in clash.items())
            raise ValueError(f"settings do not match the profile: {detail}")
        return profile

    def prepare(self, attention_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                max_new_tokens: int = 64, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> None:
        """Size every layer for one prompt batch ([B, T] mask or ids) plus `max_new_tokens` decode tokens."""
        if attention_mask is None and input_ids is None:
            raise ValueError("prepare() needs the prompt's attention_mask or input_ids")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        shape_source = attention_mask if attention_mask is not None else input_ids
        batch, length = shape_source.shape
        lengths = (attention_mask.sum(-1).cpu().numpy() if attention_mask is not None
                   else np.full(batch, length))
        budgets = keep_counts(self.profile, self.compression, lengths, self.profile.sink + self.profile.window)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RaggedLayer):
                layer.allocate(budgets[:, i], max_new_tokens, self.head_dim, dtype, torch.device(device))
            else:
                self.layers[i] = StaticSlidingWindowLayer(length + max_new_tokens, self.sliding_window)

    @property
    def is_prepared(self) -> bool:
        return all(layer.is_initialized for layer in self.layers if isinstance(layer, RaggedLayer))

    def nbytes(self) -> int:
        """Bytes held by the cache: keys, values and metadata of every layer."""
        total = 0
        for layer in self.layers:
            tensors = layer.tensors() if isinstance(layer, RaggedLayer) else [
                t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def full_cache_nbytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of transformers' uncompressed cache holding `tokens` positions, for ratios.

    Every KV head of every layer; sliding-window layers (Gemma 3) hold at most their window, as
    transformers' own caches do.
    """
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None) or tokens
    held = sum(min(tokens, window) if kind == "sliding" else tokens for kind in layer_kinds(config))
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * config.num_key_value_heads * held * head_dim_of(config) * element
