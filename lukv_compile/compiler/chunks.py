"""The inputs of every compiled call, made alike for every chunk before Dynamo sees them.

Every compiled call runs `prepare_chunk` first: the cache is checked against the model, the inputs are cut
to the new chunk (mask, positions) and its length is marked dynamic, so Dynamo compiles two graphs for the
life of a compiled model: one for chunks of any length after any history and one for single-token decode
steps (docs/architecture.md says what adds more).
"""

from __future__ import annotations

import functools
import inspect

import torch

from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.runtime.chunked_prefill import packed

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
    check_not_empty(inputs)
    if isinstance(cache, LUKVCache) and module is not None and hasattr(module, "config"):
        cache.check_model(module.config)  # before any work: a cache built for another model is refused
        cache.meet_model(module)  # and one loaded from a file saved from other weights
    relative = None
    if module is not None and isinstance(cache, LUKVCache) and cache.can_mask_chunks:
        changed = chunk_relative_inputs(inputs, cache, "position_ids" in parameters)
        if changed is not None:
            relative, inputs = cache, inputs | changed
            positional = names[:len(args)]
            args = tuple(inputs[name] for name in positional) + args[len(positional):]
            kwargs = kwargs | {name: value for name, value in changed.items() if name not in positional}
    if module is not None and "tokenizer" in kwargs and "tokenizer" not in parameters:
        # generate(stop_strings=..., tokenizer=...) hands the tokenizer on to the forward, which passes it down
        # to every decoder layer unused: Dynamo would guard on it (one graph pair more). No forward reads it.
        kwargs = {name: value for name, value in kwargs.items() if name != "tokenizer"}
    mark_chunk_dynamic(inputs)
    return args, kwargs, relative


def check_not_empty(inputs: dict) -> None:
    """An empty chunk has nothing to attend from; say so before Dynamo fails on a zero-length shape."""
    for name in ("input_ids", "inputs_embeds"):
        tensor = inputs.get(name)
        dim = SEQUENCE_DIM[name]
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= -dim and tensor.shape[dim] == 0:
            raise ValueError(f"lukv: {name} has 0 tokens (shape {tuple(tensor.shape)}); give at least one token")


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
    chunk = None
    for name, dim in SEQUENCE_DIM.items():
        tensor = inputs.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= -dim and tensor.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, tensor.dim() + dim)
            chunk = tensor.shape[dim]
    if chunk is None:
        return
    # Inputs a model names its own way (gpt-fast's input_pos [C], torchtune's mask [B, C, S_max]): their
    # dimensions of the chunk's length (past the batch dimension) are the chunk's too.
    for name, tensor in inputs.items():
        if name not in SEQUENCE_DIM and isinstance(tensor, torch.Tensor):
            for dim in range(min(1, tensor.dim() - 1), tensor.dim()):
                if tensor.shape[dim] == chunk:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)


