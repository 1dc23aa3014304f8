"""The budgets a cache gets when no profile is given: the model's own LU-KV profile, or uniform with a warning.

Said once per process and model: which profile file was found (and, when it was made on another checkpoint of
the same architecture, which), or that none was, with the command that makes one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lukv_compile.config import config_fingerprint, text_config
from lukv_compile.log import report_once
from lukv_compile.models import MODELS
from lukv_compile.profile import DEFAULT_SINK, DEFAULT_WINDOW, Profile
from lukv_compile.profiles import find_profile, user_profile_dir
from lukv_compile.runtime.errors import LUKVWarning
from lukv_compile.settings import LUKVSettings

# `lukv profile smollm2 --quick`: 32 s wall on 2 CPU cores (docs/benchmarks.md, "Profiling SmolLM2").
QUICK_PROFILE_TIME = "about 30 s for a 135M-parameter model on 2 CPU cores"
_warned: set[tuple] = set()


def model_argument(config) -> str:
    """What to pass `lukv profile` for this model: its registered name, its folder, or a placeholder."""
    name = _name(config)
    known = [short for short, spec in MODELS.items() if spec.model_id == name]
    if known:
        return known[0]
    return name if name and Path(name).is_dir() else "MODEL_FOLDER"


def default_profile(settings: LUKVSettings, config, num_layers: int, num_kv_heads: int, shards: int = 1) -> Profile:
    """The profile found for the model of `config` (matching the settings' scorer / sink / window, solved for
    `shards` where one is), else uniform budgets for the settings' scorer, with a warning once."""
    found = find_profile(config, settings.scorer, settings.sink, settings.window, shards)
    if found is not None:
        made_on = found.profile.model.get("name", "")
        other = f" (made on {made_on}, same architecture)" if made_on and made_on != _name(config) else ""
        report_once(f"lukv: LU-KV budgets from {found.path}{other}, found by the model's config fingerprint "
                    f"({found.profile.scorer} ranking); pass profile=... to choose another or 'uniform'")
        return found.profile
    uniform = uniform_profile(settings, num_layers, num_kv_heads)
    _warn_no_profile(settings, config, uniform.scorer)
    return uniform


def uniform_profile(settings: LUKVSettings, num_layers: int, num_kv_heads: int) -> Profile:
    """Every head the same share, for the settings' scorer (default snapkv) and its sink / window."""
    scorer = settings.scorer or "snapkv"
    window = DEFAULT_WINDOW[scorer] if settings.window is None else settings.window
    sink = DEFAULT_SINK if settings.sink is None else settings.sink
    return Profile.uniform(num_layers, num_kv_heads, scorer=scorer, sink=sink, window=window)


def _name(config) -> str:
    return str(getattr(config, "name_or_path", "") or "")


def _warn_no_profile(settings: LUKVSettings, config, scorer: str) -> None:
    asked = {k: getattr(settings, k) for k in ("scorer", "sink", "window") if getattr(settings, k) is not None}
    key = (config_fingerprint(config), tuple(asked.items()))
    if key in _warned:
        return
    _warned.add(key)
    wanted = " with " + ", ".join(f"{k}={v!r}" for k, v in asked.items()) if asked else ""
    model = getattr(text_config(config), "model_type", "model")
    scorer_flag = f" --scorer {settings.scorer}" if settings.scorer else ""
    warnings.warn(
        f"lukv: no LU-KV profile{wanted} for this {model} ({_name(config) or 'unnamed'}, config fingerprint "
        f"{key[0][:12]}...) in {user_profile_dir()} or the shipped profiles: every head keeps the same share "
        f"(uniform budgets, {scorer} ranking). Make its profile once with `lukv profile {model_argument(config)} "
        f"--quick{scorer_flag}` ({QUICK_PROFILE_TIME}); it is saved in {user_profile_dir()} and found from then "
        "on. profile='uniform' asks for uniform budgets without this warning",
        LUKVWarning, stacklevel=4)
