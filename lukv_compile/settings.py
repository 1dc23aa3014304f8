"""LU-KV settings: the one owner of the eviction policy, built and validated once, before any tracing.

Both routes in end here: the backend's `options={...}` (`torch.compile(model, backend="lukv", options=...)`,
`model.compile(...)`) and `LUKVCache(config, compression=..., ...)`. The cache carries the settings; the
compiled ops read them from the cache at run time, so nothing of the policy is baked into a graph and
changing it never recompiles. The backend itself only reads `inner` and `mode`; the compile entry
(compiler/entry.py) reads `regional`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from pathlib import Path

from lukv_compile.policy.scorers import SCORERS
from lukv_compile.profile import Profile

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
# inductor's modes (torch._inductor.list_mode_options). torch.compile takes `mode=` or `options=`, not both,
# so lukv takes the mode as an option too. "reduce-overhead" captures CUDA graphs around lukv::attend,
# which runs outside them (it reads host metadata and reshapes the storage).
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CACHE_POLICIES = ("lukv", "adakv")
# When eviction runs: after the first forward of a sequence (the prompt, the paper's protocol), also after
# every later multi-token forward (a new turn, a chunk), or also while decoding (a head is compressed
# back to its budget once it holds DECODE_SLACK tokens more than that).
EVICTION_POINTS = ("prompt", "turn", "always")
UNIFORM = "uniform"  # profile="uniform": every head the same share, even where the model has a profile
# prefill_chunk=C: generate() prefills a long prompt C tokens per forward, evicting after each, so the K/V
# held never exceed the budget plus C per head (prefill.py).


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"lukv option {name}={value!r} is not allowed; {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LUKVSettings:
    """What to evict and when. `None` for scorer/sink/window means "the profile's" (or the scorer's default).

    profile: None (default) is the model's own LU-KV profile, found by its config fingerprint (lukv_compile.profiles),
    else uniform budgets with a warning naming the command that makes one; "uniform" asks for uniform budgets.
    """

    profile: Profile | str | None = None
    compression: float = 0.8
    scorer: str | None = None
    sink: int | None = None
    window: int | None = None
    policy: str = "lukv"
    evict: str = "prompt"
    prefill_chunk: int | None = None
    allow_other_model: bool = False
    inner: str = "inductor"
    # Compile one decoder layer, shared by all, instead of the whole model (compiler/regional.py). None: wherever
    # the model allows it (transformers decoder layers, no sliding-window layers), else the whole model.
    regional: bool | None = None
    mode: str | None = None  # inductor's mode (INDUCTOR_MODES); None: inductor's default

    def __post_init__(self) -> None:
        c = self.compression
        # numbers.Real: numpy scalars (np.float32(0.8)) are numbers too
        _require(isinstance(c, numbers.Real) and not isinstance(c, bool) and 0.0 <= c < 1.0, "compression", c,
                 "it must be a number in [0, 1) (0.8 keeps 20%)")
        object.__setattr__(self, "compression", float(c))
        _require(self.scorer is None or self.scorer in SCORERS, "scorer", self.scorer,
                 f"choose one of {', '.join(SCORERS)}")
        for name in ("sink", "window"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 0), name, value, "it must be an int >= 0")
        _require(self.policy in CACHE_POLICIES, "policy", self.policy, f"choose one of {', '.join(CACHE_POLICIES)}")
        _require(self.evict in EVICTION_POINTS, "evict", self.evict, f"choose one of {', '.join(EVICTION_POINTS)}")
        chunk = self.prefill_chunk
        _require(chunk is None or (_is_int(chunk) and chunk >= 1), "prefill_chunk", chunk,
                 "it must be None (the prompt in one forward) or an int >= 1")
        _require(isinstance(self.allow_other_model, bool), "allow_other_model", self.allow_other_model,
                 "it must be True or False")
        _require(self.regional is None or isinstance(self.regional, bool), "regional", self.regional,
                 "it must be None (wherever the model allows), True or False")
        _require(self.inner in INNER_COMPILERS, "inner", self.inner, f"choose one of {', '.join(INNER_COMPILERS)}")
        _require(self.mode is None or self.mode in INDUCTOR_MODES, "mode", self.mode,
                 f"choose None or one of {', '.join(INDUCTOR_MODES)}")
        _require(self.mode is None or self.inner == "inductor", "mode", self.mode,
                 f"a mode is inductor's: it needs inner='inductor', got inner={self.inner!r}")
        profile = self.profile
        if isinstance(profile, (str, Path)) and profile != UNIFORM:
            object.__setattr__(self, "profile", Profile.load(profile))
        else:
            _require(profile in (None, UNIFORM) or isinstance(profile, Profile), "profile", type(profile).__name__,
                     f"pass a Profile, a path to a profile file, {UNIFORM!r}, or None (the model's own, found by "
                     "its config fingerprint)")

    @classmethod
    def from_options(cls, options: dict | None) -> LUKVSettings:
        """Settings from a backend `options=` dict; unknown keys raise, naming the allowed ones."""
        options = dict(options or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown lukv option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        return cls(**options)
