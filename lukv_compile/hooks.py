"""Make every way of compiling with lukv compress, and refuse what it cannot serve before any work.

Two small hooks, installed on import:

1. On `torch.compile(model, backend="lukv", options=...)` and `model.compile(backend="lukv", options=...)`
   (both go through Dynamo's optimize context), the options are validated at once (a bad option raises
   from that call) and the model is marked as compiled with lukv.
2. `generate()` on such a model runs on the compiled forward (for the `torch.compile(model)` form,
   whose `generate` would otherwise run the original module uncompiled) with a `LUKVCache` built from
   the options, or the user's own. Everything that can be checked before tracing is checked here:
   attention implementation, cache type, assisted decoding, use_cache=False, conflicting settings.

Every compiled call runs `prepare_chunk` first: the inputs are cut to the new chunk (mask, positions)
and its length is marked dynamic, so Dynamo compiles two graphs for the life of the process: one for
chunks of any length after any history and one for single-token decode steps (docs/architecture.md
says what adds more).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch._dynamo.eval_frame import _TorchDynamoContext
from transformers.generation.utils import GenerationMixin

from lukv_compile import handles
from lukv_compile.cache import FILL_BY_RECONSTRUCTION, LUKVCache
from lukv_compile.prefill import chunked_prefill, packed
from lukv_compile.profile import RECONSTRUCTION
from lukv_compile.regional import decoder_layers, regional_call
from lukv_compile.settings import LUKVSettings

COMPILE_FIELDS = ("inner", "regional")  # how to compile; the rest is the cache's policy
POLICY_FIELDS = tuple(f.name for f in fields(LUKVSettings) if f.name not in COMPILE_FIELDS)


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
        return result if settings is None else with_lukv(fn, result, self, settings, options)

    __call__.lukv_wrapped = True
    return __call__


def with_lukv(fn, result, context, settings: LUKVSettings, options: dict):
    """Record how generate() must run the model, and put `prepare_chunk` in front of every compiled call.

    torch.compile(model) comes through here twice: for the model (recorded), then, while the returned
    OptimizedModule is built, for the model's `__call__` (its forward, prepared like model.compile's).
    """
    if isinstance(fn, torch.nn.Module):
        if settings.regional:
            decoder_layers(fn)  # raises now for a model that cannot be compiled layer by layer
        fn.__dict__["_lukv_wrapped"] = CompiledWithLUKV(settings, options, context=context)
        return result
    owner = getattr(fn, "__self__", None)
    owner = owner if isinstance(owner, torch.nn.Module) else None
    call = compiled_call(context, result, owner if owner is not None else fn, settings.regional)
    if getattr(fn, "__func__", None) is torch.nn.Module._call_impl:  # model.compile(...): the call it installs
        owner.__dict__["_lukv_compiled"] = CompiledWithLUKV(settings, options, call=call)
    return call


def compiled_call(context, compiled, owner, regional: bool):
    """What a compiled call runs: Dynamo's `compiled` forward of `owner` (a module or a function) with
    `prepare_chunk` in front, or with `regional`, the eager forward over compiled decoder layers."""
    if regional:
        return regional_call(context, owner, preparing_chunks)
    return preparing_chunks(compiled, owner if isinstance(owner, torch.nn.Module) else None)


SEQUENCE_DIM = {"input_ids": -1, "attention_mask": -1, "position_ids": -1, "cache_position": -1,
                "inputs_embeds": -2}
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def preparing_chunks(call, module: torch.nn.Module | None):
    """`call` (a compiled forward of `module`, or of a function when None) with `prepare_chunk` in front."""
    @functools.wraps(call)
    def prepared(*args, **kwargs):
        args, kwargs, cache = prepare_chunk(module, args, kwargs)
        if cache is None:
            return call(*args, **kwargs)
        with cache.masks_over_chunk():
            return call(*args, **kwargs)

    return prepared


def prepare_chunk(module: torch.nn.Module | None, args: tuple, kwargs: dict) -> tuple[tuple, dict, LUKVCache | None]:
    """The inputs of a compiled call, made alike for every chunk before Dynamo sees them.

    For a module's forward given a LUKVCache without sliding layers, a 2-D attention mask is cut to the
    chunk's columns and missing position ids are filled in as the model would compute them; that cache is
    returned, to build its masks over the chunk alone while the call runs. Then the graph never reads how
    many tokens came before: no guard on the history's length, and later turns reuse the prompt's graph.
    (A function's arguments are not known by name, so its masks keep true offsets: right, with more graphs.)
    Last, the sequence dimension of a multi-token chunk is marked dynamic: one graph for chunks of any
    length (else Dynamo compiles the first prompt at its exact length, and again after a second length);
    single tokens stay static (Dynamo specialises size 1 anyway): the decode graph.
    """
    names, parameters = forward_parameters(module) if module is not None else ((), frozenset())
    inputs = dict(zip(names, args, strict=False)) | kwargs
    if args and isinstance(args[0], torch.Tensor):
        inputs.setdefault("input_ids", args[0])  # a positional first tensor is the token ids
    cache = inputs.get("past_key_values", inputs.get("cache"))
    relative = None
    if module is not None and isinstance(cache, LUKVCache) and cache.can_mask_chunks:
        changed = chunk_relative_inputs(inputs, cache, "position_ids" in parameters)
        if changed is not None:
            relative, inputs = cache, inputs | changed
            positional = names[:len(args)]
            args = tuple(inputs[name] for name in positional) + args[len(positional):]
            kwargs = kwargs | {name: value for name, value in changed.items() if name not in positional}
    mark_chunk_dynamic(inputs)
    return args, kwargs, relative


def forward_parameters(module: torch.nn.Module) -> tuple[tuple[str, ...], frozenset[str]]:
    """The positional parameter names of `module.forward`, and all its parameter names."""
    forward = module.forward
    function = getattr(forward, "__func__", None)
    if function is None:  # a forward set on the instance: read it each call, not cached
        return parameter_names(inspect.signature(forward).parameters.values())
    return class_forward_parameters(function)


@functools.cache
def class_forward_parameters(function) -> tuple[tuple[str, ...], frozenset[str]]:
    """`forward_parameters` of a class's forward, once per function: this runs before every decode step
    and inspect.signature costs ~0.1 ms."""
    return parameter_names(list(inspect.signature(function).parameters.values())[1:])  # without self


def parameter_names(parameters) -> tuple[tuple[str, ...], frozenset[str]]:
    parameters = list(parameters)
    return tuple(p.name for p in parameters if p.kind in POSITIONAL), frozenset(p.name for p in parameters)


def chunk_relative_inputs(inputs: dict, cache: LUKVCache, takes_positions: bool) -> dict | None:
    """The attention mask and position ids of this chunk alone (the ones that differ from `inputs`), or
    None when there are no input ids or embeddings to tell the chunk's length."""
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    new = ids if isinstance(ids, torch.Tensor) else embeds[..., 0] if isinstance(embeds, torch.Tensor) else None
    if new is None:
        return None
    chunk, changed = new.shape[-1], {}
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] > chunk:
        changed["attention_mask"] = packed(mask[:, -chunk:])  # strides alike too: no guard
    if takes_positions and inputs.get("position_ids") is None:
        seen = cache.get_seq_length()
        changed["position_ids"] = torch.arange(seen, seen + chunk, device=new.device)[None]
    return changed


def mark_chunk_dynamic(inputs: dict) -> None:
    """Mark the sequence dimension of a multi-token chunk's inputs dynamic."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        # A custom 4-D mask keeps the forward static: with a symbolic length, transformers' SDPA path
        # slices the mask by the keys' size, a use of the cache's keys the pass must refuse.
        return
    for name, dim in SEQUENCE_DIM.items():
        tensor = inputs.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= -dim and tensor.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, tensor.dim() + dim)


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
    if cache.profile.scorer == RECONSTRUCTION and cache.get_seq_length() == 0:
        raise ValueError(f"generate() got an empty LUKVCache; {FILL_BY_RECONSTRUCTION}")
    return cache


@contextlib.contextmanager
def compiled_forward(model, plan: CompiledWithLUKV):
    """generate() on the compiled forward, marking chunks dynamic: the torch.compile(model) form's generate()
    would run the original module, and model.compile()'s has no place to mark its inputs."""
    if plan.route is None:
        # Dynamo's own call, not our hook: this is not a model.compile() by the user
        plan.route = plan.call or compiled_call(
            plan.context, _TorchDynamoContext.__call__.__wrapped__(plan.context, model._call_impl), model,
            plan.settings.regional)
    restore = model._compiled_call_impl
    model._compiled_call_impl = plan.route
    try:
        yield
    finally:
        model._compiled_call_impl = restore


GENERATE_STEP_INPUTS = {"use_cache": True, "return_dict": True, "logits_to_keep": 1}  # what generate() passes


def prefill_before_generate(model, cache: LUKVCache, args: tuple, kwargs: dict) -> None:
    """Chunked prefill of all but the prompt's last token; generate() then starts from the filled cache.

    Each chunk gets the inputs generate()'s own prompt forward would (its positions, no all-ones mask, the
    same keywords), so the chunks give the same logits and run on the same graph.
    """
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if input_ids is None:
        raise ValueError("prefill_chunk needs input_ids (generate from inputs_embeds prefills in one forward)")
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {name: value for name, value in GENERATE_STEP_INPUTS.items() if takes_any or name in parameters}
    mask = kwargs.get("attention_mask")
    if mask is not None and "position_ids" in parameters:
        # generate()'s positions for a padded batch (real tokens before each), not 0..T-1
        extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if mask is not None and bool(mask.all()):
        mask = None  # generate() drops an all-ones mask too
    chunked_prefill(model, cache, input_ids, mask, cache.settings.prefill_chunk, leave=1, **extra)


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
