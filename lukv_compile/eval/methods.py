"""The compared methods: a budget allocation x a token scorer, every one a LUKVCache on the compiled path.

A method only decides how many tokens each head keeps (the budget) and which ones (the scorer), so
accuracy and memory differences come from the policy alone, not from the implementation. Names are
`budget:scorer`:

    budgets   uniform        every head keeps the same fraction
              pyramid        PyramidKV: keep fraction falling linearly with depth (1.5x -> 0.5x the mean)
              adakv          AdaKV: per-layer totals of uniform, split over the heads by score at run time
              lukv           LU-KV: per-head budgets of the shipped offline profile made for this scorer
              lukv-<s>       the budgets of the shipped profile made for scorer <s> (e.g. lukv-keydiff:oracle);
                             ranked by another runtime scorer: simulated engine only (a cache ranks with its
                             profile's own ranking)
              floored        LU-KV with a floor: every head keeps at least FLOOR_SHARE of the uniform budget
                             (`Profile.floored`; same totals), so no head the profile starves drops to ~0
              global         KVzip's selection: one top-r over every head's scores (the uniform budgets' total and
                             protection; each head keeps what passes the one threshold). On the compiled engine
                             with the oracle or a reconstruction scoring only (selection 'global' of
                             compress_context / fill_by_utility)
              globalfloor    global with AdaKV's safeguard over the whole model: every head first keeps its top
                             FLOOR_SHARE of the mean budget (selection 'floored_global')
              tp<N>          LU-KV solved for N tensor-parallel shards (`lukv profile --shards N`): every shard's
                             kept tokens within 5% of the others' (the shipped <model>-<scorer>-tpN profile)
    scorers   any runtime scorer (lukv_compile.policy.scorers), or `oracle`: tokens ranked by the oracle utility
              of the actual question (a query-aware ceiling; on the compiled engine, agnostic protocol: the
              utility of the full cache's whole conversation, every question and answer), or
              `reconstruction`: the utility of repeating the context (task-agnostic; reconstruction.py;
              `lukv:reconstruction` uses the profile solved for that ranking), or `kvzip`: KVzip's score of the
              same reconstruction (the largest attention weight, no value-output norm, unpooled), or
              `kvzip_pooled`: that score max-pooled over 7 tokens. All three fill the compiled engine's cache
              through compress_context, on any budgets

plus `full` (compression 0: the reference) and `streaming` (= uniform:streaming, StreamingLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lukv_compile.config import config_fingerprint
from lukv_compile.profile import RANKINGS, RECONSTRUCTION, SCORERS, Profile
from lukv_compile.profiles import SHIPPED_DIR, profile_file_name
from lukv_compile.profiling.reconstruction import SCORINGS
from lukv_compile.runtime.cache import LUKVCache

PROFILE_DIR = SHIPPED_DIR  # `lukv eval --profile-dir` and tests point it elsewhere


class ProfileMissingError(FileNotFoundError):
    """The shipped LU-KV profile a method needs is not there for this model."""


def layers_and_heads(model) -> tuple[int, int]:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers, config.num_key_value_heads


def profile_path(model, scorer: str, shards: int = 1) -> Path:
    return PROFILE_DIR / profile_file_name(str(getattr(model.config, "name_or_path", "") or ""), scorer, shards)


def shipped_profile(model, scorer: str, shards: int = 1) -> Profile:
    path = profile_path(model, scorer, shards)
    if not path.is_file():
        flag = f" --shards {shards}" if shards > 1 else ""
        raise ProfileMissingError(f"no shipped LU-KV {scorer} profile for this model: {path} does not exist "
                                  f"(make one with `lukv profile ... --scorer {scorer}{flag} --out {path}`)")
    profile = Profile.load(path)
    if profile.scorer != scorer:
        raise ValueError(f"{path} holds a {profile.scorer} profile, expected {scorer}")
    profile.check_model(*layers_and_heads(model), config_fingerprint(model.config))
    return profile


SELECTION_OF = {"global": "global", "globalfloor": "floored_global"}  # budgets chosen by one threshold over all heads
BUDGETS = ("uniform", "pyramid", "adakv", "lukv", "floored", *SELECTION_OF)
FLOOR_SHARE = 0.2  # as AdaKV's safeguard (budgets.ADAKV_FLOOR)
ORACLE = "oracle"
RECONSTRUCTED = SCORINGS  # scorings of the context's reconstruction: compress_context fills the cache
FILLED = (ORACLE, *RECONSTRUCTED)  # the cache is filled from a pass over the whole context (fill_by_utility)
ALIASES = {"streaming": "uniform:streaming"}


@dataclass(frozen=True)
class Method:
    """A parsed method: its name, the budgets (a Profile's fractions, sink and window), scorer and policy."""

    name: str
    scorer: str
    profile: Profile | None  # None: the full cache
    adaptive: bool = False  # AdaKV's run-time split of each layer's total
    selection: str = "budgets"  # per-head budgets, or one threshold over every head (compress_context.SELECTIONS)


def tp_shards(budget: str) -> int:
    """'tp3' -> 3; 0 for any other budget name."""
    digits = budget.removeprefix("tp")
    return int(digits) if budget.startswith("tp") and digits.isdigit() else 0


def split_name(name: str) -> tuple[str, str]:
    """'lukv-keydiff:oracle' -> ('lukv-keydiff', 'oracle'), checked; 'streaming' -> ('uniform', 'streaming')."""
    budget, sep, scorer = ALIASES.get(name, name).partition(":")
    base, _, profile_scorer = budget.partition("-")
    known_scorer = scorer in RANKINGS or scorer in FILLED
    known_budget = (budget in BUDGETS) or (base == "lukv" and profile_scorer in RANKINGS) or tp_shards(budget) > 1
    if name != "full" and not (sep and known_scorer and known_budget):
        raise ValueError(f"unknown method {name!r}; allowed: full, streaming, or budget:scorer with budget in "
                         f"{', '.join(BUDGETS)}, lukv-<scorer>, tp<N> (N >= 2) and scorer in {', '.join(RANKINGS)}, "
                         f"{', '.join(s for s in FILLED if s not in RANKINGS)}")
    return budget, scorer


def resolve(name: str, model) -> Method:
    """The Method called `name` for this model (reads the shipped profile for lukv budgets)."""
    if name == "full":
        return Method("full", "streaming", None)
    budget, scorer = split_name(name)
    layers, heads = layers_and_heads(model)
    # The oracle and reconstruction protect like the attention-free scorers (sink 4, last token); LU-KV budgets
    # keep their profile's.
    protection = "keydiff" if scorer in (ORACLE, *RECONSTRUCTED) else scorer
    if budget in ("uniform", "adakv", *SELECTION_OF):
        profile = Profile.uniform(layers, heads, scorer=protection)
    elif budget == "pyramid":
        profile = Profile.pyramid(layers, heads, scorer=protection)
    elif budget == "floored":
        profile = shipped_profile(model, scorer).floored(FLOOR_SHARE)
    elif tp_shards(budget) > 1:
        profile = shipped_profile(model, scorer, tp_shards(budget))
    else:
        profile = shipped_profile(model, budget.partition("-")[2] or scorer)
    return Method(name, scorer, profile, adaptive=budget == "adakv", selection=SELECTION_OF.get(budget, "budgets"))


def standard_methods() -> list[str]:
    """`all`: the full cache, StreamingLLM, every budget with every scorer, and the oracle with every budget."""
    ranked = [s for s in SCORERS if s != "streaming"]
    return (["full", "streaming"] + [f"{b}:{s}" for s in ranked for b in BUDGETS[:4]]
            + [f"{b}:{ORACLE}" for b in BUDGETS[:3]] + [f"lukv-{s}:{ORACLE}" for s in ranked])


def parse_methods(text: str | list[str]) -> list[str]:
    """A comma-separated string or a list -> method names ('all' expands to `standard_methods()`), checked
    before any work starts."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    names = [m for n in names for m in (standard_methods() if n == "all" else [n])]
    if not names:
        raise ValueError("no method given; e.g. full,uniform:snapkv,lukv:keydiff")
    for name in names:
        split_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {', '.join(names)}")
    return names


def borrows_budgets(method: Method) -> bool:
    """True for budgets of one ranking's profile ranked by another (`lukv-keydiff:snapkv`): a cache ranks with its
    profile's own ranking, so only the simulated engine runs them (a method scored by the oracle, reconstruction
    or a kvzip scoring is filled by fill_by_utility, which scores the context itself on any budgets)."""
    return method.profile is not None and method.scorer not in (method.profile.scorer, *FILLED)


def simulated_only(method: Method) -> str | None:
    """Why only the simulated engine runs `method`, or None when a LUKVCache runs it on the compiled path."""
    if method.selection != "budgets" and method.scorer not in FILLED:
        return ("global budgets need every layer's scores before any is kept: only the scorings that fill the "
                f"cache from a pass over the whole context ({', '.join(FILLED)}) have them")
    if borrows_budgets(method):
        if method.profile.scorer == RECONSTRUCTION:
            return ("a cache holding a reconstruction profile is filled by compress_context only "
                    f"({', '.join(RECONSTRUCTED)})")
        return f"a cache ranks with its profile's own ranking ({method.profile.scorer})"
    return None


def make_cache(name: str, model, compression: float) -> LUKVCache:
    """The LUKVCache that runs method `name` on the compiled path (the full cache ignores `compression`)."""
    method = resolve(name, model)
    if method.profile is None:
        return LUKVCache(model.config, compression=0.0)
    why = simulated_only(method)
    if why is not None:
        raise ValueError(f"{name}: only the simulated engine runs it (lukv eval --engine simulated): {why}")
    return LUKVCache(model.config, profile=method.profile, compression=compression,
                     policy="adakv" if method.adaptive else "lukv")
