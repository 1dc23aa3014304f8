"""generate() on a model compiled with lukv: on the compiled forward, with a LUKVCache, refusing what it cannot serve.

`on_generate` is the handler of lukv's hook on `GenerationMixin.generate` (compat.install_hooks). It acts
only when the model's compiled call is a lukv `CompiledForward`: after `model.compile(backend="lukv")`, or
for the duration of `compiled.generate(...)` on a `torch.compile(model, backend="lukv")` wrapper (which
installs its own forward just for that call). Every other generate runs untouched.
Everything that can be checked before tracing is checked here: attention implementation, cache type and
shape, assisted decoding, use_cache=False, conflicting settings. `cache_implementation="static"` (transformers'
torch.compile recipe) and "dynamic" are served by the LUKVCache; other kinds are refused.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import fields

from lukv_compile import compat
from lukv_compile.compiler.forward import CompiledForward, lukv_forward_of
from lukv_compile.log import report_once
from lukv_compile.profile import RECONSTRUCTION
from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.chunked_prefill import chunked_prefill
from lukv_compile.runtime.layer import FILL_BY_RECONSTRUCTION
from lukv_compile.settings import LUKVSettings

COMPILE_FIELDS = ("inner", "regional", "mode")  # how to compile; the rest is the cache's policy
POLICY_FIELDS = tuple(f.name for f in fields(LUKVSettings) if f.name not in COMPILE_FIELDS)


def on_generate(original, model, *args, **kwargs):
    forward = lukv_forward_of(model)
    cache_key = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(cache_key)
    if forward is None:
        if isinstance(cache, LUKVCache):
            raise ValueError("generate() got a LUKVCache but the model is not compiled with the lukv backend: "
                             "call model.compile(backend='lukv', options=...), or compiled = torch.compile(model, "
                             "backend='lukv', options=...) and compiled.generate(...)")
        return original(model, *args, **kwargs)
    check_generate_request(model, kwargs)
    with cache_implementation_served(model, kwargs):
        cache = kwargs[cache_key] = cache_for_generate(model, forward, cache)
        if cache.settings.prefill_chunk is not None:
            prefill_before_generate(model, cache, args, kwargs)
        return original(model, *args, **kwargs)


def generate_with(forward: CompiledForward):
    """`generate` of a torch.compile(model) wrapper: the model's generate with `forward` installed for the call.

    The wrapper's options belong to it: two wrappers of one model generate with their own, and the model
    itself is left as it was (its compiled call is restored when the call returns).
    """
    def generate(*args, **kwargs):
        with installed(forward.module, forward):
            return forward.module.generate(*args, **kwargs)

    return generate


@contextlib.contextmanager
def installed(module, forward: CompiledForward):
    before = compat.compiled_call(module)
    compat.set_compiled_call(module, forward)
    try:
        yield
    finally:
        compat.set_compiled_call(module, before)


def check_generate_request(model, kwargs: dict) -> None:
    config = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("assistant_model") is not None or kwargs.get(
            "prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None)) is not None:
        raise ValueError("assisted / prompt-lookup decoding rolls the cache back after rejected drafts, which a "
                         "compressed cache cannot do; generate without assistant_model / prompt_lookup_num_tokens")
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ValueError("the model is compiled with the lukv backend, which compresses the KV cache; "
                         "use_cache=False would run without one (compile without lukv for that)")
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation != "sdpa":
        raise ValueError(f"the model's attention implementation is {implementation!r}; the lukv backend rewrites "
                         "scaled_dot_product_attention, so load the model with attn_implementation='sdpa' "
                         "(or call model.set_attn_implementation('sdpa'))")


def cache_for_generate(model, forward: CompiledForward, cache) -> LUKVCache:
    if cache is None:
        return LUKVCache(model.config, settings=forward.settings)
    if not isinstance(cache, LUKVCache):
        raise ValueError(f"the model is compiled with the lukv backend but generate() got a {type(cache).__name__}; "
                         "pass a lukv_compile.LUKVCache or no cache (one is built from the compile options)")
    clash = {k: (v, getattr(cache.settings, k)) for k, v in forward.given.items()
             if k in POLICY_FIELDS and getattr(cache.settings, k) != getattr(forward.settings, k)}
    if clash:
        detail = ", ".join(f"{k}={given!r} in the compile options but {held!r} in the cache"
                           for k, (given, held) in clash.items())
        raise ValueError(f"conflicting lukv settings: {detail}; the cache owns the policy, so drop them from one")
    if cache.profile.scorer == RECONSTRUCTION and cache.get_seq_length() == 0:
        raise ValueError(f"generate() got an empty LUKVCache; {FILL_BY_RECONSTRUCTION}")
    return cache


# Cache kinds a LUKVCache serves in their place: it grows as tokens arrive and, like a static cache, is compiled
# once for every length (transformers' torch.compile recipe asks for "static" for exactly that).
SERVED_CACHE_IMPLEMENTATIONS = ("static", "dynamic")


@contextlib.contextmanager
def cache_implementation_served(model, kwargs: dict):
    """Within this block generate() asks for no cache kind: `cache_implementation` (keyword, the generation config
    passed, or the model's own, which transformers falls back to) is served by the LUKVCache. The model's own
    config is restored after; the kinds a LUKVCache cannot stand in for are refused."""
    passed = kwargs.get("generation_config")
    asked = kwargs.pop("cache_implementation", None) or getattr(passed, "cache_implementation", None) or getattr(
        model.generation_config, "cache_implementation", None)
    if asked is not None and asked not in SERVED_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation={asked!r} cannot be combined with the lukv backend, which keeps "
                         f"the KV cache in a LUKVCache; it stands in for {', '.join(SERVED_CACHE_IMPLEMENTATIONS)}")
    if asked is None:
        yield
        return
    report_once(f"lukv: cache_implementation={asked!r} is served by a LUKVCache (compressed, compiled once for "
                "every length)")
    if getattr(passed, "cache_implementation", None) is not None:
        kwargs["generation_config"] = passed = copy.deepcopy(passed)
        passed.cache_implementation = None
    own = model.generation_config.cache_implementation
    model.generation_config.cache_implementation = None
    try:
        yield
    finally:
        model.generation_config.cache_implementation = own


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


