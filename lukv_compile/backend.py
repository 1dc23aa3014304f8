"""The `lukv` torch.compile backend: rewrite cache-backed attention, then hand off to an inner compiler.

The backend only chooses the inner compiler (`inner`, and inductor's `mode`); the policy options travel with the cache
(settings.py). torch.compile hands it `options=` as given; they were already validated when
`torch.compile` / `model.compile` was called (hooks.py), and are validated again here for callers that
reach the backend another way.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._dynamo.utils import counters

from lukv_compile.kernels import ops  # noqa: F401  (registers the lukv:: ops)
from lukv_compile.passes import rewrite_attention
from lukv_compile.settings import LUKVSettings


def lukv_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor], *, mode: str | None = None,
                 options: dict | None = None):
    """torch.compile backend. `options`: see lukv_compile.settings.LUKVSettings; `mode` (or the `mode`
    option: torch.compile takes one of mode= and options=) goes to inductor."""
    settings = LUKVSettings.from_options(options)
    inner, mode = settings.inner, mode or settings.mode
    if mode is not None and inner != "inductor":
        raise ValueError(f"lukv: mode={mode!r} is inductor's; it needs inner='inductor', got inner={inner!r}")
    rewrite_attention(gm)
    counters["lukv"]["graphs_compiled"] += 1
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=inductor_patches(mode))


def inductor_patches(mode: str | None) -> dict | None:
    """inductor config for `mode`; with CUDA graphs, partitioned around lukv::attend (cudagraph_unsafe)
    rather than skipped for the whole graph."""
    if not mode:
        return None
    from torch._inductor import list_mode_options

    patches = list_mode_options(mode)
    return patches | {"graph_partition": True} if patches.get("triton.cudagraphs") else patches


def register() -> None:
    """Register "lukv" unless torch already has it (registered, or discovered as our entry point).

    Registering twice crashes (`duplicate name`): torch registers entry-point backends itself when it
    loads them, and loading the entry point imports this package.
    """
    from torch._dynamo.backends import registry

    if "lukv" in registry._COMPILER_FNS or registry._BACKENDS.get("lukv") is not None:
        return
    registry.register_backend(lukv_backend, name="lukv")
