"""Where LU-KV profiles are found for a model: the user's profile folder first, then the ones shipped here, each
matched to the model by its config fingerprint.

A compile or a `LUKVCache` given no `profile` gets the profile found here (`find_profile`), so the one line is
LU-KV wherever a profile exists; `lukv profile MODEL` writes into the user's folder (`user_profile_dir`), where
it is found from then on. Within one folder, a profile solved for the tensor-parallel shard count in use comes
first, then one solved for one process; then the rankings in DEFAULT_RANKINGS order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lukv_compile.config import config_fingerprint
from lukv_compile.log import report_once
from lukv_compile.profile import Profile, ProfileError

SHIPPED_DIR = Path(__file__).resolve().parent
PROFILE_DIR_ENV = "LUKV_PROFILE_DIR"
# Preferred first when a folder holds profiles of several rankings for one model: their order on held-out data
# (SmolLM2, docs/results.md "The default ranking": window_expected_attention ahead of keydiff in 5 of 6 cells of
# held-out split 1 and 6 of 6 of split 2; snapkv and expected_attention far behind on the selection tasks).
# `reconstruction` is never a default: a cache holding it is filled by compress_context only.
DEFAULT_RANKINGS = ("window_expected_attention", "keydiff", "snapkv", "expected_attention")


def user_profile_dir() -> Path:
    """$LUKV_PROFILE_DIR, else $XDG_CACHE_HOME/lukv_compile/profiles (~/.cache/lukv_compile/profiles)."""
    if os.environ.get(PROFILE_DIR_ENV):
        return Path(os.environ[PROFILE_DIR_ENV]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "lukv_compile" / "profiles"


def profile_dirs() -> tuple[Path, ...]:
    return user_profile_dir(), SHIPPED_DIR


def profile_file_name(model_name: str, scorer: str, shards: int = 1) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1.gguf', 'keydiff', 3 -> 'smollm2-135m-instruct-keydiff-tp3.safetensors'
    (a model id or folder, the ranking, and the shard count when the budgets are balanced over shards)."""
    stem = model_name.split(":")[0].rstrip("/").split("/")[-1].lower()
    return f"{stem}-{scorer}{f'-tp{shards}' if shards > 1 else ''}.safetensors"


@dataclass(frozen=True)
class FoundProfile:
    profile: Profile
    path: Path


def shards_of(profile: Profile) -> int:
    """The tensor-parallel shard count the profile's budgets were balanced for (1: one process)."""
    try:
        return int(json.loads(profile.calibration).get("shards", 1))
    except (ValueError, AttributeError, TypeError):
        return 1


@cache
def _read(path: Path, mtime_ns: int) -> Profile | None:
    """The profile in `path` as of `mtime_ns` (re-read when the file changes), or None, said once, if unreadable."""
    try:
        return Profile.load(path)
    except (ProfileError, OSError, ValueError) as error:
        report_once(f"lukv: skipped {path} while looking for a model's profile: not a readable profile ({error})")
        return None


def _profiles_in(folder: Path) -> list[FoundProfile]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        profile = _read(path, path.stat().st_mtime_ns)
        if profile is not None:
            found.append(FoundProfile(profile, path))
    return found


def find_profile(config, scorer: str | None = None, sink: int | None = None, window: int | None = None,
                 shards: int = 1) -> FoundProfile | None:
    """The profile for the model of `config` (by config fingerprint) with the given scorer / sink / window (None:
    any), from the first folder of `profile_dirs()` that has one; None when no folder has."""
    fingerprint = config_fingerprint(config)
    asked = {"scorer": scorer, "sink": sink, "window": window}

    def fits(found: FoundProfile) -> bool:
        p = found.profile
        return (p.fingerprint == fingerprint and p.scorer in DEFAULT_RANKINGS
                and all(want is None or getattr(p, name) == want for name, want in asked.items()))

    def preference(found: FoundProfile) -> tuple:
        solved_for = shards_of(found.profile)
        return solved_for != shards, solved_for != 1, DEFAULT_RANKINGS.index(found.profile.scorer), found.path.name

    for folder in profile_dirs():
        candidates = [f for f in _profiles_in(folder) if fits(f)]
        if candidates:
            return min(candidates, key=preference)
    return None
