"""The properties a user's model must keep under lukv, as checks their CI can run.

    subject = Subject(model, profile=profile)            # the model, its profile, the compile under test
    check_property("exact_at_full_budget", subject)      # raises PropertyFailed, naming what and where

Each property draws its inputs with hypothesis (`subject.max_examples` each) and compares what lukv computes
with what it must compute. A failure is a `PropertyFailed` naming the property, hypothesis' minimal failing
inputs and what differed. `PROPERTIES` lists them in the order they are run (the touch-point canary first:
when an upgrade of torch or transformers moved a private API lukv relies on, that is said before any model
runs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lukv_compile import compat
from lukv_compile.config import config_fingerprint, kv_shape, text_config
from lukv_compile.policy.budgets import keep_counts
from lukv_compile.profile import Profile, ProfileError
from lukv_compile.runtime.cache import LUKVCache, full_cache_nbytes
from lukv_compile.runtime.layer import RaggedLayer
from lukv_compile.testing import strategies
from lukv_compile.testing.generation import (
    TOLERANCE,
    assert_same_conversation,
    assert_same_generation,
    generate_logits,
    left_padded_batch,
)
from lukv_compile.testing.simulation import masked_reference

# Tokens a prompt of `budgets_respected` has beyond twice the protected ones: with fewer, each head's room to grow
# (storage.MIN_ROOM = 16 free slots) outweighs what compression saves, and a short prompt's cache is no smaller.
PAST_ROOM = 64


class PropertyFailed(AssertionError):
    """A lukv property does not hold for this model: which, on which inputs, and what differed."""


@dataclass
class Subject:
    """A model under test: the model (eval mode, SDPA attention), its LU-KV profile (None: uniform budgets), the
    lukv compile options the properties compile it with (default: the default options, inner inductor), how
    many examples each property draws, and the longest prompt drawn."""

    model: torch.nn.Module
    profile: Profile | None = None
    options: dict | None = None
    max_examples: int = 10
    longest: int = 96

    @functools.cached_property
    def compiled(self):
        """The model compiled once with lukv: every property shares it, as a user's process would."""
        return torch.compile(self.model, backend="lukv", options=dict(self.options or {}))

    @property
    def config(self):
        return text_config(self.model.config)

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    @property
    def tolerance(self) -> float:
        return TOLERANCE.get(next(self.model.parameters()).dtype, 1e-4)

    def cache(self, compression: float, **settings) -> LUKVCache:
        return LUKVCache(self.model.config, profile=self.profile, compression=compression, **settings)

    def protected(self) -> int:
        profile = self.cache(0.0).profile
        return profile.sink + profile.window


def hypothesis_settings(subject: Subject):
    return settings(max_examples=subject.max_examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])


# ---------------------------------------------------------------- the properties


def touch_points(subject: Subject | None = None) -> None:
    """lukv's private touch-points into torch and transformers are where lukv expects them (compat.py)."""
    broken = compat.check_touch_points()
    assert not broken, "\n".join(broken)


def profile_match(subject: Subject) -> None:
    """The profile was made for this model (shape and config fingerprint)."""
    if subject.profile is None:
        return  # uniform budgets fit any model
    layers, heads, _ = kv_shape(subject.config)
    subject.profile.check_model(layers, heads, config_fingerprint(subject.config))


def exact_at_full_budget(subject: Subject) -> None:
    """At compression 0 the compiled model generates what the plain model does: prompt lengths, chunked prefill
    and decoding modes (greedy, beams, sampling with one seed)."""
    @hypothesis_settings(subject)
    @given(length=strategies.prompt_lengths(subject.longest), chunk=strategies.chunkings(subject.longest),
           mode=strategies.generate_modes(), seed=strategies.seeds())
    def check(length, chunk, mode, seed):
        ids, mask = left_padded_batch([length], subject.vocab, seed)
        torch.manual_seed(seed)
        want = generate_logits(subject.model, ids, mask, 5, **mode)
        torch.manual_seed(seed)
        got = generate_logits(subject.compiled, ids, mask, 5, cache=subject.cache(0.0, prefill_chunk=chunk), **mode)
        assert_same_generation(got, want, subject.tolerance)

    check()


def batch_with_padding(subject: Subject) -> None:
    """At compression 0 a left-padded batch generates what the plain model does for it."""
    @hypothesis_settings(subject)
    @given(lengths=strategies.padded_batches(subject.longest), seed=strategies.seeds())
    def check(lengths, seed):
        ids, mask = left_padded_batch(lengths, subject.vocab, seed)
        want = generate_logits(subject.model, ids, mask, 5)
        assert_same_generation(generate_logits(subject.compiled, ids, mask, 5, cache=subject.cache(0.0)), want,
                               subject.tolerance)

    check()


def multi_turn(subject: Subject) -> None:
    """At compression 0 a conversation (three turns on one cache) equals the plain model's."""
    @hypothesis_settings(subject)
    @given(length=strategies.prompt_lengths(subject.longest), turns=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 5)), min_size=2, max_size=3), seed=strategies.seeds())
    def check(length, turns, seed):
        assert_same_conversation(subject.compiled, subject.model, (length,), tuple(turns), subject.vocab, seed,
                                 subject.tolerance, profile=subject.profile)

    check()


def compressed_equals_masked_simulation(subject: Subject) -> None:
    """Compressed, the model computes what a dense model masking exactly the evicted tokens computes (a prompt,
    then a second turn), so eviction is real and nothing else changes."""
    @hypothesis_settings(subject)
    @given(lengths=strategies.padded_batches(subject.longest, rows=2), compression=strategies.compressions(),
           seed=strategies.seeds())
    def check(lengths, compression, seed):
        lengths = [n + subject.protected() for n in lengths]  # long enough that every head evicts
        cache = subject.cache(compression)
        got = two_turns(subject.compiled, lengths, subject.vocab, seed, cache)
        reference = masked_reference(subject.model, cache, got[0].shape[1])
        assert_same_generation(got, two_turns(reference, lengths, subject.vocab, seed), subject.tolerance)

    check()


def two_turns(model, lengths: list[int], vocab: int, seed: int, cache=None):
    """A prompt, 4 new tokens, a second user turn of 6 tokens, 4 new tokens, on one cache (a DynamicCache when
    none is given): (sequences, both turns' logits)."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids, mask = left_padded_batch(lengths, vocab, seed)
    first = generate_logits(model, ids, mask, 4, cache=cache)
    said = torch.randint(1, vocab, (len(lengths), 6), generator=torch.Generator().manual_seed(seed + 1))
    history = torch.cat([first[0], said], dim=1)
    mask = torch.cat([mask, torch.ones(len(lengths), history.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    second = generate_logits(model, history, mask, 4, cache=cache)
    return second[0], torch.cat([first[1], second[1]], dim=1)


def budgets_respected(subject: Subject) -> None:
    """After a prompt each KV head holds at most its budget (the profile's keep count for the prompt's length),
    plus one token per decode step; the bytes held are the compressed size, not the full cache's."""
    @hypothesis_settings(subject)
    @given(lengths=strategies.padded_batches(subject.longest, rows=2), compression=strategies.compressions(),
           seed=strategies.seeds())
    def check(lengths, compression, seed):
        lengths = [n + PAST_ROOM + 2 * subject.protected() for n in lengths]  # long enough to be compressed
        ids, mask = left_padded_batch(lengths, subject.vocab, seed)
        cache = subject.cache(compression)
        steps = 3
        generate_logits(subject.compiled, ids, mask, steps, cache=cache)
        p = cache.profile
        budget = keep_counts(p, compression, lengths, p.sink + p.window)  # [B, L, H]
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, RaggedLayer):
                held = layer.store.held
                over = held - (budget[:, i] + steps - 1)  # the last generated token is not fed yet
                assert (over <= 0).all(), (f"layer {i} holds {held.tolist()} tokens per head, over its budget "
                                           f"{budget[:, i].tolist()} + {steps - 1} decoded")
        total = ids.shape[1] + steps - 1
        full = full_cache_nbytes(subject.model.config, len(lengths), total, next(subject.model.parameters()).dtype)
        assert cache.nbytes() < full, f"the cache holds {cache.nbytes()} bytes, the full cache {full}"

    check()


def compiles_once(subject: Subject) -> None:
    """After the first prompt and decode step, other prompt lengths, compressions and later turns compile no
    new graph (batch size 1)."""
    compiled = torch.compile(subject.model, backend="lukv", options=dict(subject.options or {}))
    graphs = compat.counters()["lukv"]

    def run(length: int, compression: float, seed: int) -> None:
        cache = subject.cache(compression)
        first = generate_logits(compiled, *left_padded_batch([length], subject.vocab, seed), 3, cache=cache)[0]
        turn = torch.cat([first, torch.randint(1, subject.vocab, (1, 7))], dim=1)
        generate_logits(compiled, turn, torch.ones_like(turn), 3, cache=cache)

    run(subject.longest // 2, 0.8, 0)
    made = graphs["graphs_compiled"]

    @hypothesis_settings(subject)
    @given(length=strategies.prompt_lengths(subject.longest, 2 + subject.protected()),
           compression=strategies.compressions(), seed=strategies.seeds())
    def check(length, compression, seed):
        run(length, compression, seed)
        assert graphs["graphs_compiled"] == made, (f"{graphs['graphs_compiled'] - made} graph(s) compiled after the "
                                                   f"first {made}: TORCH_LOGS=recompiles says why")

    check()


PROPERTIES: dict[str, Callable[[Subject], None]] = {
    "touch_points": touch_points,
    "profile_match": profile_match,
    "exact_at_full_budget": exact_at_full_budget,
    "batch_with_padding": batch_with_padding,
    "multi_turn": multi_turn,
    "compressed_equals_masked_simulation": compressed_equals_masked_simulation,
    "budgets_respected": budgets_respected,
    "compiles_once": compiles_once,
}


def check_property(name: str, subject: Subject) -> None:
    """Run property `name` on `subject`; raise `PropertyFailed` naming it, the minimal inputs and the difference."""
    if name not in PROPERTIES:
        raise ValueError(f"unknown lukv property {name!r}; the properties are {', '.join(PROPERTIES)}")
    try:
        with torch.no_grad():
            PROPERTIES[name](subject)
    except (AssertionError, ProfileError, RuntimeError, ValueError) as e:
        inputs = "\n".join(getattr(e, "__notes__", []))  # hypothesis' failing example, shrunk to a minimal one
        doc = " ".join((PROPERTIES[name].__doc__ or "").split())
        raise PropertyFailed(f"lukv property {name} failed: {doc}\n{inputs}\n{type(e).__name__}: {e}") from e
