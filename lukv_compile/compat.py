"""Every private API of torch and transformers that lukv touches, in one place.

Each touch-point is a small function here and one entry of `TOUCH_POINTS`; `check_touch_points()` (run by
the project's canary test and by `lukv_compile.testing`) names any that an upgrade moved, with the
installed versions, before a model runs. Nothing here runs at import: the two hooks lukv needs
(`install_hooks`) go in when torch first looks up the `lukv` backend (compiler/entry.py).

Tested range: pyproject.toml's `torch` and `transformers` pins.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import transformers

# ---- torch.compile's front door (torch._dynamo.eval_frame, private)


def dynamo_context_class() -> type:
    """The class whose `__call__` torch.compile(fn_or_module) and nn.Module.compile go through."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    return _TorchDynamoContext


def compile_with(context, fn: Callable) -> Callable:
    """What Dynamo's own `context(fn)` returns, bypassing lukv's hook (the original `__call__`)."""
    call = dynamo_context_class().__call__
    return getattr(call, "__wrapped__", call)(context, fn)


def backend_options(context) -> dict | None:
    """The `options=` of a Dynamo context whose backend is lukv, else None.

    torch.compile wraps a named backend in `_TorchCompileWrapper` (`compiler_name`, `kwargs`) and Dynamo wraps
    that again (`_torchdynamo_orig_backend` / `_torchdynamo_orig_callable`).
    """
    backend = getattr(context, "callback", None)
    for _ in range(8):
        if backend is None:
            return None
        if getattr(backend, "compiler_name", None) == "lukv":
            return dict((getattr(backend, "kwargs", None) or {}).get("options") or {})
        backend = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(
            backend, "_torchdynamo_orig_callable", None)
    return None


def register_backend(fn: Callable, name: str) -> None:
    """Register `fn` as backend `name` unless torch has it (registered, or discovered as an entry point)."""
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    registry.register_backend(fn, name=name)


# ---- nn.Module's compiled call (private attributes of torch.nn.Module)


def compiled_call(module: torch.nn.Module):
    """What `module(...)` runs instead of its forward after `module.compile()` (None: the forward)."""
    return module._compiled_call_impl


def set_compiled_call(module: torch.nn.Module, call) -> None:
    """Install `call` as the module's compiled call; None restores the class default (no instance attribute)."""
    if call is None:
        module.__dict__.pop("_compiled_call_impl", None)
    else:
        module._compiled_call_impl = call


def call_impl(module: torch.nn.Module) -> Callable:
    """The module's call with its hooks, without the compiled-call dispatch (so a compiled call can use it)."""
    return module._call_impl


def is_call_impl(fn) -> bool:
    """True for `module._call_impl` bound to a module: what nn.Module.compile hands torch.compile."""
    return getattr(fn, "__func__", None) is torch.nn.Module._call_impl and isinstance(fn.__self__, torch.nn.Module)


# ---- Dynamo settings and errors (torch._dynamo.config / exc)


def dynamo_settings(**values):
    """A reusable context manager setting Dynamo config values (recompile_limit, ...) while it is entered."""
    return torch._dynamo.config.patch(**values)


def dynamic_sources(pattern: str):
    """A reusable context manager: values whose Dynamo source name matches `pattern` start out dynamic."""
    return torch.compiler.config.patch(dynamic_sources=pattern)


def recompile_limit() -> int:
    return torch._dynamo.config.recompile_limit


def raise_recompile_limit(limit: int) -> None:
    """For lukv's own command-line tools only (their process): Dynamo's limit, at least `limit`."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def recompile_limit_error() -> type[Exception]:
    """What Dynamo raises at the recompile limit when `fail_on_recompile_limit_hit` is set."""
    return torch._dynamo.exc.FailOnRecompileLimitHit


def counters():
    """Dynamo's counters dict (`counters["lukv"]` holds the pass's counts; reset by torch._dynamo.reset())."""
    from torch._dynamo.utils import counters

    return counters


# ---- inner compilers (torch._inductor / torch._dynamo.backends, private)


def inductor(gm, example_inputs, config_patches: dict | None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config_patches)


def aot_eager(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


def inductor_mode_options(mode: str) -> dict:
    from torch._inductor import list_mode_options

    return list_mode_options(mode)


# ---- transformers


def generation_mixin() -> type:
    from transformers.generation.utils import GenerationMixin

    return GenerationMixin


def decoder_layer_class() -> type:
    """transformers' base of every decoder layer (what regional compilation compiles one of)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


# ---- the hooks


def install_hooks(on_compile: Callable, on_generate: Callable) -> None:
    """Route Dynamo's `context(fn)` through `on_compile(original, context, fn)` and `GenerationMixin.generate`
    through `on_generate(original, model, *args, **kwargs)`. Idempotent; `uninstall_hooks` undoes it."""
    context_class, mixin = dynamo_context_class(), generation_mixin()
    if not hasattr(context_class.__call__, "lukv_hook"):
        context_class.__call__ = _hook(context_class.__call__, on_compile)
    if not hasattr(mixin.generate, "lukv_hook"):
        mixin.generate = _hook(mixin.generate, on_generate)


def uninstall_hooks() -> None:
    for owner, name in ((dynamo_context_class(), "__call__"), (generation_mixin(), "generate")):
        method = getattr(owner, name)
        if hasattr(method, "lukv_hook"):
            setattr(owner, name, method.__wrapped__)


def hooks_installed() -> bool:
    return hasattr(dynamo_context_class().__call__, "lukv_hook") and hasattr(generation_mixin().generate, "lukv_hook")


def _hook(original: Callable, handler: Callable) -> Callable:
    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        return handler(original, self, *args, **kwargs)

    hooked.lukv_hook = True
    return hooked


# ---- the canary


def _touch_points() -> dict[str, Callable[[], Any]]:
    """name -> a check that raises (or returns False) when the touch-point is gone or changed shape."""
    import inspect

    def module_attributes():
        module = torch.nn.Linear(1, 1)
        return hasattr(module, "_compiled_call_impl") and callable(module._call_impl)

    def context_call():
        return "fn" in inspect.signature(dynamo_context_class().__call__).parameters

    def compile_wrapper():
        from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS  # noqa: F401

        wrapper = torch._TorchCompileWrapper("eager", None, {"x": 1}, None)
        return wrapper.compiler_name == "eager" and wrapper.kwargs.get("options") == {"x": 1}

    def dynamo_config():
        c = torch._dynamo.config
        return all(hasattr(c, name) for name in ("recompile_limit", "fail_on_recompile_limit_hit",
                                                  "allow_unspec_int_on_nn_module")) and hasattr(
            torch.compiler.config, "dynamic_sources")

    def inner_compilers():
        from torch._dynamo.backends.debugging import aot_eager  # noqa: F401
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx  # noqa: F401

        return "triton.cudagraphs" in list_mode_options("reduce-overhead")

    def generate():
        return "self" in inspect.signature(generation_mixin().generate).parameters

    def cache_layers():
        from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer  # noqa: F401

        return "layers" in inspect.signature(Cache.__init__).parameters

    return {
        "torch.nn.Module._compiled_call_impl / _call_impl": module_attributes,
        "torch._dynamo.eval_frame._TorchDynamoContext.__call__": context_call,
        "torch._TorchCompileWrapper (compiler_name, kwargs) and torch._dynamo.backends.registry": compile_wrapper,
        "torch._dynamo.config (recompile_limit, fail_on_recompile_limit_hit, allow_unspec_int_on_nn_module), "
        "torch.compiler.config.dynamic_sources":
            dynamo_config,
        "torch._dynamo.exc.FailOnRecompileLimitHit": lambda: issubclass(recompile_limit_error(), Exception),
        "torch._inductor (compile_fx, list_mode_options) and torch._dynamo.backends.debugging.aot_eager":
            inner_compilers,
        "transformers GenerationMixin.generate": generate,
        "transformers.modeling_layers.GradientCheckpointingLayer": lambda: isinstance(decoder_layer_class(), type),
        "transformers.cache_utils (Cache(layers=), CacheLayerMixin, DynamicSlidingWindowLayer)": cache_layers,
    }


TOUCH_POINTS = tuple(_touch_points())


def check_touch_points() -> list[str]:
    """One message per touch-point that is gone or changed, naming it and the installed versions."""
    failures = []
    for name, check in _touch_points().items():
        try:
            ok = check()
        except Exception as e:  # an ImportError, AttributeError, ... is exactly what an upgrade does
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "it no longer has the shape lukv relies on"
        if not ok:
            failures.append(f"lukv touch-point {name} broke under torch {torch.__version__} / transformers "
                            f"{transformers.__version__} ({why}); lukv is tested on the versions pyproject.toml pins")
    return failures
