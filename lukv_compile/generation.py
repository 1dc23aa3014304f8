"""Make `model.compile(backend="lukv", options=...)` + `model.generate()` use a LUKVCache, no more code.

generate() builds its cache before the first forward, so the backend (called at the first forward)
is too late to choose it. Instead we wrap `GenerationMixin._prefill`: if the model's compiled call
was made with the lukv backend, the default cache is swapped for a LUKVCache built from the same
options, and any LUKVCache (ours or the user's) is sized for this prompt and max_length.
"""

from __future__ import annotations

import functools

from transformers.generation.utils import GenerationMixin

from lukv_compile.cache import LUKVCache
from lukv_compile.options import parse_options


def compile_options(model) -> dict | None:
    """The options of `model.compile(backend="lukv", options=...)`, or None if not compiled with lukv.

    torch keeps them on the backend wrapper that torch.compile built; we follow the chain of
    `_torchdynamo_orig_backend` wrappers from the compiled call's Dynamo callback to it.
    """
    compiled = getattr(model, "_compiled_call_impl", None)
    config_fn = getattr(compiled, "get_compiler_config", None)
    cells = getattr(config_fn, "__closure__", None) or ()
    backend = next((c.cell_contents.callback for c in cells if hasattr(c.cell_contents, "callback")), None)
    for _ in range(8):
        if backend is None:
            return None
        if getattr(backend, "compiler_name", None) == "lukv":
            return (backend.kwargs or {}).get("options") or {}
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def prepare_cache(model, cache: LUKVCache, input_ids, generation_config, model_kwargs: dict) -> None:
    if cache.is_prepared and cache.get_seq_length() > 0:
        raise ValueError("this LUKVCache already holds a sequence; call cache.reset() to reuse it for a new "
                         "prompt (continuing a compressed sequence with a multi-token prompt is not supported)")
    cache.prepare(attention_mask=model_kwargs.get("attention_mask"), input_ids=input_ids,
                  max_new_tokens=generation_config.max_length - input_ids.shape[1],
                  dtype=model.dtype, device=model.device)


def lukv_prefill(original):
    @functools.wraps(original)
    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get("cache")
        options = compile_options(self)
        if options is not None and not isinstance(cache, LUKVCache) and generation_config.use_cache:
            if getattr(cache, "_is_user_defined", False):
                raise ValueError(f"the model is compiled with the lukv backend but generate() got a "
                                 f"{type(cache).__name__}; pass a LUKVCache or none")
            cache = model_kwargs["cache"] = LUKVCache(self.config, **parse_options(options).cache_kwargs())
        if isinstance(cache, LUKVCache):
            prepare_cache(self, cache, input_ids, generation_config, model_kwargs)
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)

    _prefill.lukv_wrapped = True
    return _prefill


def install() -> None:
    if not getattr(GenerationMixin._prefill, "lukv_wrapped", False):
        GenerationMixin._prefill = lukv_prefill(GenerationMixin._prefill)
