"""Regional compilation (the default wherever the model allows; `options={"regional": False}` compiles the
whole model): compile one decoder layer, not the whole model.

A decoder-only model repeats one layer class N times (SmolLM2: 30). Dynamo traces the whole model's
forward in seconds per layer, twice (a chunk graph and a decode graph); traced per layer, the same code
is traced once and reused by every layer (Dynamo keys compiled code by the layer's code object and the
layer's weights are graph inputs). The glue around the layers (embedding, masks, RoPE tables, final
norm, LM head) runs eagerly. The first call on SmolLM2 goes from ~14 s of tracing to ~1 s.

What each layer needs to share one graph:
  - its `layer_idx` must not be a constant of the graph: Dynamo treats the attention module's int as a
    symbolic input from the first call (`allow_unspec_int_on_nn_module` and `dynamic_sources`, set only
    around a regional forward), and `LUKVCache.update` passes it straight to the op without indexing a Python list
    (which would pin it);
  - the chunk's length is marked dynamic on every layer input that has it (hidden states, the mask, the
    RoPE tables, positions), as chunks.prepare_chunk does for the model's inputs.
The eager glue hands the layers no mask when a chunk has no padding, so a compiled model makes three layer
graphs per batch size: chunks with a padding mask, chunks without, and decode steps. A second batch size compiles the
set again with the batch dynamic, which then serves every later size.

Models with sliding-window layers compile whole by default and are refused with regional=True: their cache
layers differ by index (transformers' sliding layer or a ragged one), so the index would be pinned in every
graph. So are models without transformers decoder layers (plain PyTorch modules).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from lukv_compile import compat
from lukv_compile.compiler.chunks import preparing_chunks
from lukv_compile.config import sliding_layers


class RegionalCompileError(ValueError):
    """The model cannot be compiled layer by layer (raised at the compile call, before any work)."""


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder layers; raises when there are none or when any layer slides."""
    if not isinstance(model, torch.nn.Module):
        raise RegionalCompileError("lukv option regional=True compiles a model's decoder layers; it needs an "
                                   f"nn.Module, not {type(model).__name__} (compile without regional)")
    layers = [m for m in model.modules() if isinstance(m, compat.decoder_layer_class())]
    if not layers:
        raise RegionalCompileError(f"lukv option regional=True: {type(model).__name__} has no transformers decoder "
                                   "layers (GradientCheckpointingLayer) to compile; compile without regional")
    config = getattr(model, "config", None)
    sliding = sliding_layers(config) if config is not None else []
    if sliding:
        raise RegionalCompileError(f"lukv option regional=True: layers {sliding} of this model use sliding-window "
                                   "attention, whose cache layers differ by index; compile without regional")
    return layers


def can_compile_regionally(model) -> bool:
    """Whether `decoder_layers(model)` would serve: what regional=None (the default) decides by."""
    try:
        decoder_layers(model)
    except RegionalCompileError:
        return False
    return True


def regional_call(compile_layer: Callable[[Callable], Callable], model: torch.nn.Module, run: Callable) -> Callable:
    """The model's forward (`run`: its call, or its own bound forward) run eagerly with each decoder layer on the
    compiled layer graph.

    `compile_layer(call)` compiles one layer's call (with the user's backend and options, through the
    CompiledForward's own entry, so the layers share their graphs); the eager forward gets
    chunks.preparing_chunks, so masks and positions are built as in the whole-model form.
    """
    layers = decoder_layers(model)
    compiled = [marking_chunk_dynamic(compile_layer(compat.call_impl(layer))) for layer in layers]
    forward = preparing_chunks(run, model)
    # Layer indices symbolic, from the first call (else Dynamo first compiles layer 0 with its index constant and
    # recompiles at layer 1, one graph more for nothing). Set once around the forward, not per layer: the eager
    # glue between the layers compiles nothing, and a decode step would pay two patches per layer otherwise.
    unspec_ints = compat.dynamo_settings(allow_unspec_int_on_nn_module=True)
    index_dynamic = compat.dynamic_sources(LAYER_INDEX_SOURCE)

    def call(*args, **kwargs):
        with layers_compiled(layers, compiled), unspec_ints, index_dynamic:
            return forward(*args, **kwargs)

    return call


@contextlib.contextmanager
def layers_compiled(layers: list[torch.nn.Module], compiled: list):
    """Within this block each layer's call runs its compiled call (nn.Module's own `_compiled_call_impl`)."""
    before = [compat.compiled_call(layer) for layer in layers]
    for layer, call in zip(layers, compiled, strict=True):
        compat.set_compiled_call(layer, call)
    try:
        yield
    finally:
        for layer, call in zip(layers, before, strict=True):
            compat.set_compiled_call(layer, call)


LAYER_INDEX_SOURCE = r".*\.layer_idx$"  # Dynamo's name for the attention module's index, read in cache.update()

# Where a decoder layer's inputs hold the chunk's length, by rank (transformers' layout): [C] cache
# positions, [B, C] position ids, [B, C, *] hidden states and RoPE tables, [B, 1, C, C] masks. By place,
# not by size: a head_dim equal to the chunk's length must stay static.
SEQUENCE_DIMS = {1: (0,), 2: (1,), 3: (1,), 4: (2, 3)}


def marking_chunk_dynamic(compiled_layer):
    """`compiled_layer` with the chunk's length marked dynamic on its inputs."""
    @functools.wraps(compiled_layer)
    def call(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        chunk = hidden.shape[1]
        if chunk > 1:  # single tokens stay static: the decode graph
            for value in (*args, *kwargs.values()):
                for tensor in value if isinstance(value, tuple) else (value,):
                    mark_length_dynamic(tensor, chunk)
        return compiled_layer(*args, **kwargs)

    return call


def mark_length_dynamic(tensor, chunk: int) -> None:
    if isinstance(tensor, torch.Tensor):
        for dim in SEQUENCE_DIMS.get(tensor.dim(), ()):
            if tensor.shape[dim] == chunk:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
