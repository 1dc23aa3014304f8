"""Make every way of compiling with lukv compress, and refuse what it cannot serve before any work.

Two small hooks, installed on import:

1. On `torch.compile(model, backend="lukv", options=...)` and `model.compile(backend="lukv", options=...)`
   (both go through Dynamo's optimize context), the options are validated at once (a bad option raises
   from that call) and the model is marked as compiled with lukv.
2. `generate()` on such a model runs on the compiled forward (for the `torch.compile(model)` form,
   whose `generate` would otherwise run the original module uncompiled) with a `LUKVCache` built from
   the options, or the user's own. Everything that can be checked before tracing is checked here:
   attention implementation, cache type, assisted decoding, use_cache=False, conflicting settings.

Both compiled calls (generate's and a `torch.compile(model)` called by hand) mark the sequence dimension
of a multi-token chunk dynamic, so Dynamo compiles two graphs for the life of the process: one for
prompts of any length and one for single-token decode steps (docs/architecture.md says what adds more).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch._dynamo.eval_frame import _TorchDynamoContext
from transformers.generation.utils import GenerationMixin

from lukv_compile import handles
from lukv_compile.cache import LUKVCache
from lukv_compile.prefill import chunked_prefill
from lukv_compile.settings import LUKVSettings

POLICY_FIELDS = tuple(f.name for f in fields(LUKVSettings) if f.name != "inner")


@dataclass
class CompiledWithLUKV:
    settings: LUKVSettings
    given: dict  # the options as the user wrote them
    call: Any = None  # model.compile: the compiled call it installed
    context: Any = None  # torch.compile(model): the Dynamo context, to compile generate's forward with
    route: Any = None


def lukv_options(context) -> dict | None:
    """The `options=` of a Dynamo context whose backend is lukv, else None."""
    backend = context.callback
    for _ in range(8):
        if backend is None:
            return None
        if getattr(backend, "compiler_name", None) == "lukv":
            return dict((getattr(backend, "kwargs", None) or {}).get("options") or {})
        backend = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(
            backend, "_torchdynamo_orig_callable", None)
    return None


def on_optimize(original):
    @functools.wraps(original)
    def __call__(self, fn, *args, **kwargs):
        options = lukv_options(self)
        settings = LUKVSettings.from_options(options) if options is not None else None  # raises before any work
        result = original(self, fn, *args, **kwargs)
        if settings is not None:
            mark(fn, result, self, settings, options)
        return result

    __call__.lukv_wrapped = True
    return __call__


def mark(fn, result, context, settings: LUKVSettings, options: dict) -> None:
    if isinstance(fn, torch.nn.Module):  # torch.compile(model, ...)
        fn.__dict__["_lukv_wrapped"] = CompiledWithLUKV(settings, options, context=context)
        result.register_forward_pre_hook(mark_chunk_dynamic, with_kwargs=True)  # runs before Dynamo's frame
    elif getattr(fn, "__func__", None) is torch.nn.Module._call_impl:  # model.compile(...)
        fn.__self__.__dict__["_lukv_compiled"] = CompiledWithLUKV(settings, options, call=result)


SEQUENCE_DIM = {"input_ids": -1, "attention_mask": -1, "position_ids": -1, "cache_position": -1,
                "inputs_embeds": -2}


def mark_chunk_dynamic(module, args: tuple, kwargs: dict) -> None:
    """Mark the sequence dimension of a multi-token chunk's inputs dynamic (a forward pre-hook's signature).

    Without it Dynamo compiles the first prompt at its exact length, and again (dynamic) after a second
    length: three graphs. Single tokens stay static (Dynamo specialises size 1 anyway): the decode graph.
    A positional first argument is the input ids.
    """
    inputs = dict(kwargs, input_ids=args[0]) if args and isinstance(args[0], torch.Tensor) else kwargs
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        # A custom 4-D mask keeps the forward static: with a symbolic length, transformers' SDPA path
        # slices the mask by the keys' size, a use of the cache's keys the pass must refuse.
        return
    for name, dim in SEQUENCE_DIM.items():
        tensor = inputs.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= -dim and tensor.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, tensor.dim() + dim)


def marking_chunks_dynamic(call):
    @functools.wraps(call)
    def forward(*args, **kwargs):
        mark_chunk_dynamic(None, args, kwargs)
        return call(*args, **kwargs)

    return forward


def compiled_with_lukv(model) -> CompiledWithLUKV | None:
    """How `model.generate` must run: compiled in place with lukv, or wrapped by torch.compile with lukv."""
    compiled = model.__dict__.get("_lukv_compiled")
    if compiled is not None and model._compiled_call_impl is compiled.call:
        return compiled
    wrapped = model.__dict__.get("_lukv_wrapped")
    if wrapped is not None and model._compiled_call_impl is None:
        return wrapped
    return None


def check_generate_request(model, kwargs: dict) -> None:
    config = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("assistant_model") is not None or kwargs.get(
            "prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None)) is not None:
        raise ValueError("assisted / prompt-lookup decoding rolls the cache back after rejected drafts, which a "
                         "compressed cache cannot do; generate without assistant_model / prompt_lookup_num_tokens")
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ValueError("the model is compiled with the lukv backend, which compresses the KV cache; "
                         "use_cache=False would run without one (compile without lukv for that)")
    if kwargs.get("cache_implementation") is not None:
        raise ValueError("cache_implementation cannot be combined with the lukv backend: it builds a LUKVCache")
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation != "sdpa":
        raise ValueError(f"the model's attention implementation is {implementation!r}; the lukv backend rewrites "
                         "scaled_dot_product_attention, so load the model with attn_implementation='sdpa' "
                         "(or call model.set_attn_implementation('sdpa'))")


def cache_for_generate(model, plan: CompiledWithLUKV, cache) -> LUKVCache:
    if cache is None:
        return LUKVCache(model.config, settings=plan.settings)
    if not isinstance(cache, LUKVCache):
        raise ValueError(f"the model is compiled with the lukv backend but generate() got a {type(cache).__name__}; "
                         "pass a lukv_compile.LUKVCache or no cache (one is built from the compile options)")
    clash = {k: (v, getattr(cache.settings, k)) for k, v in plan.given.items()
             if k in POLICY_FIELDS and getattr(cache.settings, k) != getattr(plan.settings, k)}
    if clash:
        detail = ", ".join(f"{k}={given!r} in the compile options but {held!r} in the cache"
                           for k, (given, held) in clash.items())
        raise ValueError(f"conflicting lukv settings: {detail}; the cache owns the policy, so drop them from one")
    return cache


@contextlib.contextmanager
def compiled_forward(model, plan: CompiledWithLUKV):
    """generate() on the compiled forward, marking chunks dynamic: the torch.compile(model) form's generate()
    would run the original module, and model.compile()'s has no place to mark its inputs."""
    if plan.route is None:
        # Dynamo's own call, not our hook: this is not a model.compile() by the user
        compiled = plan.call or _TorchDynamoContext.__call__.__wrapped__(plan.context, model._call_impl)
        plan.route = marking_chunks_dynamic(compiled)
    restore = model._compiled_call_impl
    model._compiled_call_impl = plan.route
    try:
        yield
    finally:
        model._compiled_call_impl = restore


def prefill_before_generate(model, cache: LUKVCache, args: tuple, kwargs: dict) -> None:
    """Chunked prefill of all but the prompt's last token; generate() then starts from the filled cache."""
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if input_ids is None:
        raise ValueError("prefill_chunk needs input_ids (generate from inputs_embeds prefills in one forward)")
    chunked_prefill(model, cache, input_ids, kwargs.get("attention_mask"), cache.settings.prefill_chunk, leave=1)


def lukv_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        plan = compiled_with_lukv(self)
        cache_key = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(cache_key)
        if plan is None:
            if isinstance(cache, LUKVCache):
                raise ValueError("generate() got a LUKVCache but the model is not compiled with the lukv backend: "
                                 "call model.compile(backend='lukv', options=...) or use "
                                 "torch.compile(model, backend='lukv', options=...) first")
            return original(self, *args, **kwargs)
        check_generate_request(self, kwargs)
        cache = kwargs[cache_key] = cache_for_generate(self, plan, cache)
        with compiled_forward(self, plan):
            if cache.settings.prefill_chunk is not None:
                prefill_before_generate(self, cache, args, kwargs)
            return original(self, *args, **kwargs)

    generate.lukv_wrapped = True
    return generate


def install() -> None:
    handles.watch_recompile_limit()
    if not getattr(_TorchDynamoContext.__call__, "lukv_wrapped", False):
        _TorchDynamoContext.__call__ = on_optimize(_TorchDynamoContext.__call__)
    if not getattr(GenerationMixin.generate, "lukv_wrapped", False):
        GenerationMixin.generate = lukv_generate(GenerationMixin.generate)
