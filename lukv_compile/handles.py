"""Cache handles: how a compiled graph's ops find the LUKVCache they serve.

Each cache gets a 0-d int64 CPU tensor holding a process-unique number. The tensor is a graph input
(a Python int would be baked into the graph and recompile for every new cache); the ops read the
number and look the cache up here. Caches are held weakly: a dropped cache frees its storage.
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch

_caches: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_numbers = itertools.count(1)


class RecompileLimitWatch(logging.Filter):
    """Remembers Dynamo's "hit config.recompile_limit" warning, so a marker that then runs eagerly can say why."""

    hit: str = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config."):
            RecompileLimitWatch.hit = record.getMessage().splitlines()[0]
        return True


def watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, RecompileLimitWatch) for f in logger.filters):
        logger.addFilter(RecompileLimitWatch())


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
    return cache_of(handle).layers[layer_idx]


def outside_backend_message(handle: torch.Tensor, layer_idx: int) -> str:
    """Why a cache marker ran eagerly, with what the user can do about it."""
    message = (f"LUKVCache layer {layer_idx} was used outside the lukv backend, so its attention cannot run. "
               "Compile the model with the lukv backend (model.compile(backend='lukv', options=...), or "
               "compiled = torch.compile(model, backend='lukv', options=...) and call compiled)")
    if RecompileLimitWatch.hit:
        message += (f". If it is compiled: Dynamo reported \"{RecompileLimitWatch.hit}\" in this process, and then "
                    "runs forwards eagerly; raise torch._dynamo.config.recompile_limit or compile fewer variants "
                    "(TORCH_LOGS=recompiles says why each recompile happened)")
    return message
