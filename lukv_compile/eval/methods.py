"""The compared methods, every one a LUKVCache: same ragged storage, same compiled kernels.

A method only decides the budget allocation (a Profile, or AdaKV's run-time split) and the scorer, so
accuracy, memory and latency differences come from the policy alone, not from the implementation.

    full                     compression 0: every token kept (the reference)
    streaming                StreamingLLM: sink 4 + the most recent tokens, uniform over heads
    snapkv                   SnapKV scores, uniform budget per head
    pyramidkv                SnapKV scores, keep fraction falling linearly with depth
    adakv                    SnapKV scores, per-layer totals of uniform, split over heads at run time
    lukv_snapkv / lukv_keydiff / lukv_expected_attention
                             LU-KV: per-head budgets from the shipped offline profile for that scorer
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from lukv_compile.cache import LUKVCache
from lukv_compile.models import config_fingerprint
from lukv_compile.profile import Profile

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

CacheFactory = Callable[[object, float], LUKVCache]


class ProfileMissingError(FileNotFoundError):
    """The shipped LU-KV profile a method needs is not there for this model."""


def layers_and_heads(model) -> tuple[int, int]:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers, config.num_key_value_heads


def profile_stem(model) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1.gguf' -> 'smollm2-135m-instruct' (the shipped file prefix)."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    return name.split(":")[0].rstrip("/").split("/")[-1].lower()


def profile_path(model, scorer: str) -> Path:
    return PROFILE_DIR / f"{profile_stem(model)}-{scorer}.safetensors"


def shipped_profile(model, scorer: str) -> Profile:
    path = profile_path(model, scorer)
    if not path.is_file():
        raise ProfileMissingError(f"no shipped LU-KV {scorer} profile for this model: {path} does not exist "
                                  f"(make one with `lukv profile ... --scorer {scorer} --out {path}`)")
    profile = Profile.load(path)
    if profile.scorer != scorer:
        raise ValueError(f"{path} holds a {profile.scorer} profile, expected {scorer}")
    profile.check_model(*layers_and_heads(model), config_fingerprint(model.config))
    return profile


def full(model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, compression=0.0)


def streaming(model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, profile=Profile.uniform(*layers_and_heads(model), scorer="streaming"),
                     compression=compression)


def snapkv(model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, profile=Profile.uniform(*layers_and_heads(model), scorer="snapkv"),
                     compression=compression)


def pyramidkv(model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, profile=Profile.pyramid(*layers_and_heads(model), scorer="snapkv"),
                     compression=compression)


def adakv(model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, profile=Profile.uniform(*layers_and_heads(model), scorer="snapkv"),
                     compression=compression, policy="adakv")


def lukv(scorer: str, model, compression: float) -> LUKVCache:
    return LUKVCache(model.config, profile=shipped_profile(model, scorer), compression=compression)


METHODS: dict[str, CacheFactory] = {
    "full": full,
    "streaming": streaming,
    "snapkv": snapkv,
    "pyramidkv": pyramidkv,
    "adakv": adakv,
    "lukv_snapkv": partial(lukv, "snapkv"),
    "lukv_keydiff": partial(lukv, "keydiff"),
    "lukv_expected_attention": partial(lukv, "expected_attention"),
}


def parse_methods(text: str | list[str]) -> list[str]:
    """'all', a comma-separated string or a list -> method names, checked before any work starts."""
    names = list(METHODS) if text == "all" else [n.strip() for n in (text.split(",") if isinstance(text, str)
                                                                      else text) if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"allowed: {', '.join(METHODS)} or all")
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {', '.join(names)}")
    return names


def make_cache(method: str, model, compression: float) -> LUKVCache:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method](model, compression)
