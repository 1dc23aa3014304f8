"""Warm start: PyTorch's compile artifacts (the "mega-cache") saved by one process, loaded by the next.

    path = lukv_compile.warm_start(model)       # before the first compiled call: load what an earlier run saved
    compiled.generate(...)                      # compiles (warm: inductor's code and AOT graphs come from the file)
    lukv_compile.save_warm_start(model)         # after it: save this process's artifacts for the next one

Dynamo still traces in every process; what the file skips is inductor's code generation and C++ builds,
the bulk of a cold inductor compile. The inner `aot_eager` / `eager` compilers cache nothing, so with them
there is nothing to save. Files live under the user cache ($XDG_CACHE_HOME/lukv, else ~/.cache/lukv), one
per torch version and model architecture; a stale entry inside one is never used (every artifact is keyed
by its graph), it only takes space.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def artifacts_path(model: torch.nn.Module) -> Path:
    """Where the compile artifacts for this model's architecture and this torch version are kept."""
    from lukv_compile.config import config_fingerprint

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lukv"
    return root / f"torch-{torch.__version__}-{config_fingerprint(model.config)[:16]}.bin"


def caching_disabled() -> bool:
    """True when inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, as in tests and CI)."""
    return bool(torch.compiler.config.force_disable_caches)


def warm_start(model: torch.nn.Module) -> Path | None:
    """Load the artifacts an earlier process saved for this model; the file loaded, or None if there was none."""
    path = artifacts_path(model)
    if caching_disabled() or not path.is_file():
        return None
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return path


def save_warm_start(model: torch.nn.Module) -> Path | None:
    """Save this process's compile artifacts for the next process; the file written, or None if there was
    nothing to save (caches off, or only aot_eager / eager compiles)."""
    saved = None if caching_disabled() else torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    path = artifacts_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_bytes(saved[0])
    partial.replace(path)  # atomic: a process loading at the same time never reads half a file
    return path
