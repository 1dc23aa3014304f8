"""The model a user's CI tests: a saved transformers folder, a name `lukv_compile.models` knows, or
`package.module:factory` (a function returning the model, in eval mode with SDPA attention)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from lukv_compile.profile import Profile
from lukv_compile.testing.properties import Subject


def load_model_spec(spec: str) -> torch.nn.Module:
    """The model `spec` names (see module docstring); a clear error for anything else."""
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec, attn_implementation="sdpa").eval()
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            made = getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as e:
            raise ValueError(f"lukv model {spec!r}: cannot call {factory} from module {module_name} ({e})") from e
        if not isinstance(made, torch.nn.Module):
            raise ValueError(f"lukv model {spec!r}: {factory}() returned {type(made).__name__}, not a torch model")
        return made.eval()
    from lukv_compile import models

    if spec not in models.MODELS:
        raise ValueError(f"lukv model {spec!r} is neither a saved transformers model folder, nor a name lukv knows "
                         f"({', '.join(sorted(models.MODELS))}), nor package.module:factory")
    return models.load_model(spec)[0]


def load_subject(spec: str, profile: str | Path | None = None, max_examples: int = 10,
                 inner: str | None = None) -> Subject:
    """The Subject the properties run on: the model, its profile file (None: uniform budgets) and the compile
    options (`inner` None: the default, inductor)."""
    if max_examples < 1:
        raise ValueError(f"max examples must be >= 1, got {max_examples}")
    loaded = Profile.load(profile) if profile is not None else None
    return Subject(load_model_spec(spec), loaded, {"inner": inner} if inner else None, max_examples)
