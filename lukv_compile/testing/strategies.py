"""Hypothesis strategies for a user's model: prompts, chunkings, padded batches, compressions, generate modes.

Every strategy takes the model's limits (vocabulary, longest prompt) so a draw is always a valid input.
"""

from __future__ import annotations

from hypothesis import strategies as st

COMPRESSIONS = (0.5, 0.8, 0.9)
GENERATE_MODES = ("greedy", "beam", "sampling")


def prompt_lengths(longest: int = 96, shortest: int = 2) -> st.SearchStrategy[int]:
    return st.integers(shortest, longest)


def padded_batches(longest: int = 96, rows: int = 3) -> st.SearchStrategy[list[int]]:
    """Real lengths of a batch's rows (left-padded to the longest)."""
    return st.lists(prompt_lengths(longest), min_size=1, max_size=rows)


def chunkings(longest: int = 96) -> st.SearchStrategy[int | None]:
    """A `prefill_chunk` (tokens per prefill forward), or None: the prompt in one forward."""
    return st.one_of(st.none(), st.integers(8, max(8, longest // 2)))


def compressions() -> st.SearchStrategy[float]:
    return st.sampled_from(COMPRESSIONS)


def generate_modes() -> st.SearchStrategy[dict]:
    """generate() keywords of one decoding mode (sampling with a fixed seed is compared token for token)."""
    return st.sampled_from(GENERATE_MODES).map(lambda mode: {
        "greedy": {"do_sample": False},
        "beam": {"do_sample": False, "num_beams": 2},
        "sampling": {"do_sample": True, "top_k": 8},
    }[mode])


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**16)
