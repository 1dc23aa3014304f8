"""Cache handles: how a compiled graph's ops find the LUKVCache they serve.

Each cache gets a 0-d int64 CPU tensor holding a process-unique number. The tensor is a graph input
(a Python int would be baked into the graph and recompile for every new cache); the ops read the
number and look the cache up here. Caches are held weakly: a dropped cache frees its storage.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_caches: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_numbers = itertools.count(1)


def new_handle(cache) -> torch.Tensor:
    number = next(_numbers)
    _caches[number] = cache
    return torch.tensor(number, dtype=torch.int64)


def cache_of(handle: torch.Tensor):
    cache = _caches.get(int(handle))
    if cache is None:
        raise RuntimeError(f"lukv: cache handle {int(handle)} names no live LUKVCache (was the cache deleted?)")
    return cache


def layer(handle: torch.Tensor, layer_idx: int):
    layers = cache_of(handle).layers
    if not 0 <= layer_idx < len(layers):
        raise RuntimeError(f"lukv: the model's layer {layer_idx} has no layer in its LUKVCache, which holds "
                           f"{len(layers)}; build the cache from this model's config: LUKVCache(model.config, ...)")
    return layers[layer_idx]


def outside_backend_message(layer_idx: int) -> str:
    """Why a cache marker ran eagerly, with what the user can do about it."""
    return (f"LUKVCache layer {layer_idx} was used outside the lukv backend, so its attention cannot run. "
            "Compile the model with the lukv backend (model.compile(backend='lukv', options=...), or "
            "compiled = torch.compile(model, backend='lukv', options=...) and call compiled)")
