"""CompiledForward: one lukv compile of a model (or function), owning its settings and its compiled graphs.

What `torch.compile(model, backend="lukv", options=...)` makes the wrapper's forward, and what
`model.compile(backend="lukv", options=...)` installs as the model's compiled call. Nothing is stored on
the model: two compiles of one model are two CompiledForwards with their own options and graphs.

Each CompiledForward enters Dynamo through a function with its own code object (`fresh_entry`). Dynamo keeps
compiled graphs, and counts recompiles, per code object; entering through `nn.Module._call_impl` (what
Dynamo would otherwise compile) shares one count with every model compiled in the process, so a notebook's
fifth model would hit the limit. Each compile has its own LUKV_RECOMPILE_LIMIT, and reaching it raises
`CompileLimitError` (never a silent eager fallback, which lukv's ops cannot run).
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import types
from collections.abc import Callable

import torch

from lukv_compile import compat
from lukv_compile.compiler.chunks import preparing_chunks
from lukv_compile.compiler.regional import can_compile_regionally, regional_call
from lukv_compile.passes import UnsupportedAttention
from lukv_compile.runtime.buffers import buffer_model_config
from lukv_compile.runtime.cache import LUKVCache, describe_shape
from lukv_compile.settings import LUKVSettings

# Graphs one compiled model may make (Dynamo's default, 8, is shared by every model in the process): a chunk
# and a decode graph per batch size and generate mode, four per batch size regionally (compiler/regional.py).
LUKV_RECOMPILE_LIMIT = 64


# The CompiledForward whose call is running: the backend, compiling a graph for it, reaches its buffer cache.
_running: contextvars.ContextVar[CompiledForward | None] = contextvars.ContextVar("lukv_running", default=None)


class CompileLimitError(RuntimeError):
    """A lukv-compiled model reached its recompile limit; `torch._dynamo.reset()` clears it."""


def _entry_for(call):
    def enter(*args, **kwargs):
        return call(*args, **kwargs)

    return enter


_ENTRY_CODE = _entry_for(None).__code__
_entries = itertools.count()


def fresh_entry_code() -> types.CodeType:
    """A code object of its own for one compile: Dynamo keeps graphs and counts recompiles per code object."""
    name = f"lukv_forward_{next(_entries)}"
    return _ENTRY_CODE.replace(co_name=name, co_qualname=name)


def entry_function(code: types.CodeType, call: Callable) -> Callable:
    """`call` behind a plain function running `code`: the first frame Dynamo compiles. (A plain function, not
    a partial: Dynamo wraps other callables in a function of its own, shared by every compile.)"""
    return types.FunctionType(code, _entry_for.__globals__, code.co_name, None, (types.CellType(call),))


def dynamo_compiled(context, code: types.CodeType, call: Callable) -> Callable:
    """`call` compiled by the user's Dynamo context (its backend and options), entered through `code`."""
    return compat.compile_with(context, entry_function(code, call))


class CompiledForward:
    """The compiled forward of `module` with lukv `settings`: its call (hooks included), or `target` when given
    (a module's own bound `forward`, as transformers' recipe `model.forward = torch.compile(model.forward)`
    compiles it, or a plain function when module is None).

    `given` is the options dict as the user wrote it (generate() compares it with a cache's settings).
    `buffer_cache`: for a model that keeps its own KV buffers (gpt-fast), the LUKVCache serving them, made when
    the first graph is compiled (`lukv_compile.buffer_cache(compiled)` returns it).
    """

    def __init__(self, context, settings: LUKVSettings, given: dict, module: torch.nn.Module | None = None,
                 target: Callable | None = None):
        self.settings, self.given, self.module = settings, given, module
        self.regional = settings.regional if settings.regional is not None else can_compile_regionally(module)
        run = target if target is not None else compat.call_impl(module)
        if target is not None:
            self.__signature__ = inspect.signature(target)  # what a module whose forward this replaces takes
        code = fresh_entry_code()  # one per compile: every layer of a regional compile shares its graphs
        if self.regional:
            self.call = regional_call(lambda call: dynamo_compiled(context, code, call),
                                      module if module is not None else target, run)
        else:
            self.call = preparing_chunks(dynamo_compiled(context, code, run), module)
        self.limit = max(compat.recompile_limit(), LUKV_RECOMPILE_LIMIT)
        self.limits = compat.dynamo_settings(recompile_limit=self.limit, fail_on_recompile_limit_hit=True)
        self.buffer_cache: LUKVCache | None = None

    def cache_for_buffers(self, layers: int, q_heads: int, kv_heads: int, head_dim: int) -> LUKVCache:
        """The LUKVCache serving the model's own KV buffers: `layers` attentions over [B, kv_heads, S, head_dim]
        buffers in one graph (made by the first graph, the same for every later one)."""
        if self.buffer_cache is None:
            if self.settings.prefill_chunk:
                raise UnsupportedAttention(
                    f"lukv option prefill_chunk={self.settings.prefill_chunk} is how generate() cuts a prompt; a model "
                    "keeping its own KV buffers is called chunk by chunk by its own loop: call it with chunks of that "
                    "many tokens (with evict='turn' each is evicted to the budget) and leave prefill_chunk unset")
            config = buffer_model_config(self.module, layers, q_heads, kv_heads, head_dim)
            self.buffer_cache = LUKVCache(config, self.settings)
            if isinstance(self.module, torch.nn.Module):
                self.buffer_cache.meet_model(self.module)  # what buffer_cache(compiled).save records
        elif self.buffer_cache.shape != (layers, kv_heads, head_dim):
            raise UnsupportedAttention(
                f"lukv: this graph attends over KV buffers of {describe_shape((layers, kv_heads, head_dim))}, but "
                f"an earlier graph of this compiled model over {describe_shape(self.buffer_cache.shape)}: every "
                "layer's attention must be in one graph (a graph break splits them: TORCH_LOGS=graph_breaks says "
                "where)")
        return self.buffer_cache

    def __call__(self, *args, **kwargs):
        token = _running.set(self)
        try:
            with self.limits:
                return self.call(*args, **kwargs)
        except compat.recompile_limit_error() as e:
            raise CompileLimitError(
                f"lukv: this compiled model reached Dynamo's recompile limit ({self.limit} graphs for one compile): "
                "each new batch size, input form or generate mode compiles a graph pair. TORCH_LOGS=recompiles "
                "says why each was made; torch._dynamo.reset() clears the graphs (and this limit); raise "
                "torch._dynamo.config.recompile_limit above it before compiling to allow more") from e
        finally:
            _running.reset(token)


def running_forward() -> CompiledForward:
    """The CompiledForward whose call is compiling the graph the backend has been given."""
    forward = _running.get()
    if forward is None:
        raise UnsupportedAttention("lukv: a model keeping its own KV buffers must be compiled with "
                                   "torch.compile(model, backend='lukv', ...) or model.compile(backend='lukv', ...), "
                                   "which own the cache that serves them")
    return forward


def lukv_forward_of(model) -> CompiledForward | None:
    """The model's lukv forward: its compiled call (model.compile / a wrapper's generate), or its forward
    attribute (a torch.compile(model) wrapper's, or transformers' recipe `model.forward = torch.compile(...)`)."""
    for forward in (compat.compiled_call(model), vars(model).get("forward")):
        if isinstance(forward, CompiledForward):
            return forward
    return None


def buffer_cache(model: torch.nn.Module) -> LUKVCache:
    """The LUKVCache serving a lukv-compiled model that keeps its own KV buffers (gpt-fast, torchtune): what its
    heads keep (`kept_positions()` per layer) and the bytes held (`nbytes()`). `model` is the torch.compile
    wrapper, or the model after model.compile(backend="lukv")."""
    forward = lukv_forward_of(model)
    if forward is None:
        raise ValueError(f"{type(model).__name__} was not compiled with the lukv backend: compile it with "
                         "torch.compile(model, backend='lukv', ...) or model.compile(backend='lukv', ...)")
    if forward.buffer_cache is None:
        raise ValueError(f"this lukv-compiled {type(forward.module).__name__} keeps no KV buffers the lukv pass "
                         "found (or has not run yet): a transformers model's cache is the one generate() returns")
    return forward.buffer_cache
