"""How `torch.compile(model, backend="lukv")` and `model.compile(backend="lukv")` reach lukv.

torch imports this module when it first looks up the `lukv` backend (the `torch_dynamo_backends` entry point
in pyproject.toml names `lukv_backend` here), and that is when lukv's two hooks go in
(compat.install_hooks); `import lukv_compile` alone changes nothing in torch or transformers.

1. Dynamo's `context(fn)`, which both compile calls go through: for a lukv context the options are validated
   at once (a bad option raises from the compile call) and the result gets a `CompiledForward` owning them:
   - `torch.compile(model)`: the returned wrapper's forward, plus a `generate` of its own and
     `lukv_settings`; the model is left exactly as it was;
   - `model.compile()` (in place, by its own definition): the model's compiled call;
   - `model.forward = torch.compile(model.forward, ...)` (transformers' recipe): the new forward.
2. `GenerationMixin.generate`: runs on the compiled forward with a LUKVCache when the model's compiled call
   is a CompiledForward (compiler/generate.py); otherwise untouched.
"""

from __future__ import annotations

import contextvars

import torch

from lukv_compile import compat
from lukv_compile.compiler.backend import lukv_backend
from lukv_compile.compiler.forward import CompiledForward
from lukv_compile.compiler.generate import generate_with, on_generate
from lukv_compile.settings import LUKVSettings

__all__ = ["install", "lukv_backend"]

# Set while torch builds a wrapper for torch.compile(model): its own compile of the model's __call__ passes
# through untouched (lukv replaces that forward with the CompiledForward).
_building = contextvars.ContextVar("lukv_building_wrapper", default=False)


def on_compile(original, context, fn, *args, **kwargs):
    options = compat.backend_options(context)
    if options is None or _building.get():
        return original(context, fn, *args, **kwargs)
    settings = LUKVSettings.from_options(options)  # raises before any work
    if isinstance(fn, torch.nn.Module):
        token = _building.set(True)
        try:
            wrapper = original(context, fn, *args, **kwargs)
        finally:
            _building.reset(token)
        return with_forward(wrapper, CompiledForward(context, settings, options, module=fn))
    if compat.is_call_impl(fn):  # model.compile(): the call it installs on the model
        return CompiledForward(context, settings, options, module=fn.__self__)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module) and getattr(fn, "__name__", None) == "forward":
        # transformers' recipe: model.forward = torch.compile(model.forward, ...)
        return CompiledForward(context, settings, options, module=owner, target=fn)
    return CompiledForward(context, settings, options, target=fn)


def with_forward(wrapper: torch.nn.Module, forward: CompiledForward) -> torch.nn.Module:
    """The torch.compile wrapper running `forward`, with its own generate and settings.

    Set on the wrapper's own __dict__: OptimizedModule forwards other attribute writes to the model.
    """
    wrapper.forward = forward  # one of OptimizedModule's own attributes
    object.__setattr__(wrapper, "generate", generate_with(forward))
    object.__setattr__(wrapper, "lukv_settings", forward.settings)
    return wrapper


def install() -> None:
    compat.install_hooks(on_compile, on_generate)


install()
