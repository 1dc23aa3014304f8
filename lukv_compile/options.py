"""Backend options: parsing and validation with clear errors, before anything is compiled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lukv_compile.profile import Profile, check_compression, check_scorer

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
CACHE_POLICIES = ("lukv", "adakv")
ALLOWED = ("profile", "compression", "scorer", "sink", "window", "policy", "inner")


@dataclass(frozen=True)
class LUKVOptions:
    profile: Profile | None = None
    compression: float = 0.8
    scorer: str | None = None
    sink: int | None = None
    window: int | None = None
    policy: str = "lukv"
    inner: str = "inductor"

    def cache_kwargs(self) -> dict:
        return {"profile": self.profile, "compression": self.compression, "scorer": self.scorer,
                "sink": self.sink, "window": self.window, "policy": self.policy}


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"lukv option {name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_count(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"lukv option {name} must be a non-negative int, got {value!r}")


def parse_options(options: dict | None) -> LUKVOptions:
    """Validate a backend `options=` dict; unknown keys and bad values raise ValueError naming them."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(ALLOWED))
    if unknown:
        raise ValueError(f"unknown lukv option(s) {', '.join(unknown)}; allowed: {', '.join(ALLOWED)}")
    profile = options.get("profile")
    if isinstance(profile, (str, Path)):
        profile = Profile.load(profile)
    elif profile is not None and not isinstance(profile, Profile):
        raise ValueError(f"lukv option profile must be a Profile or a path, got {type(profile).__name__}")
    check_compression(options.get("compression", 0.8))
    if options.get("scorer") is not None:
        check_scorer(options["scorer"])
    check_count("sink", options.get("sink"))
    check_count("window", options.get("window"))
    check_choice("policy", options.get("policy", "lukv"), CACHE_POLICIES)
    check_choice("inner", options.get("inner", "inductor"), INNER_COMPILERS)
    return LUKVOptions(**{**options, "profile": profile})
