"""RULER-style synthetic long-context tasks, generated locally, seeded and deterministic.

A sample is a long `context` (prefilled and compressed before the question is seen), a `question`
asked after compression, and the `answers` that must all appear in the generated text. Contexts are
sized in tokens of the tokenizer passed in: within +-5% of `context_tokens` (in practice within 1%).

Tasks (after RULER, Hsieh et al. 2024):
- passkey: a 5-digit pass key hidden in repeated noise sentences.
- niah_single: one "special magic number" for a key, hidden in a haystack text (Austen's Persuasion by default).
- niah_multikey: four needles with different keys; one is asked for (the others are distractors).
- niah_multivalue: four numbers for the same key; all are asked for.
- niah_multiquery: four keys; all four numbers are asked for.
- variable_tracking: a chain VAR A = 12345, VAR B = VAR A, ... in noise; all names holding the value.
- common_words: a numbered word list; the 10 words repeated most often.
- frequent_words: random "coded words" whose counts follow Zipf's law; the 3 most frequent.
- niah_multiturn: four keys; one number asked per turn, all four questions on the same compressed context
  (SCBench's shared-context setting), in a question form of its own ("Which number does the text list for ...?").

The niah_* tasks take their haystack from `lukv_compile.data.HAYSTACKS`: Persuasion (the default), Python source
code, a software licence agreement or a team chat log, all disjoint from the calibration text (Northanger Abbey), so
results can also be reported on text unlike it. The last three are ~2k words each: long contexts repeat them.
passkey and variable_tracking always hide their needles in repeated noise sentences.
"""

from __future__ import annotations

import random
import re
import string
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from math import isqrt
from typing import Any, NamedTuple

from lukv_compile.data import HAYSTACKS, haystack_text

TASKS = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "niah_multiturn",
)
# Room for an answer that first restates the question (SmolLM2 does, unless the answer prefix is given).
MAX_NEW_TOKENS = {
    "passkey": 16,
    "niah_single": 32,
    "niah_multikey": 32,
    "niah_multivalue": 64,
    "niah_multiquery": 96,
    "variable_tracking": 64,
    "common_words": 96,
    "frequent_words": 48,
    "niah_multiturn": 32,  # per question
}
HAYSTACK_TASKS = tuple(t for t in TASKS if t.startswith("niah"))  # the tasks `haystack=` changes
MULTI_QUESTION_TASKS = {"niah_multiturn"}  # later questions in later turns: the compiled engine runs them
TOLERANCE = 0.05  # contexts are guaranteed within this fraction of the requested token count
_FIT_TARGET = 0.01  # what the length search aims for, well inside TOLERANCE
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NUM_NEEDLES = 4
VT_HOPS = 4
CWE_NUM_COMMON = 10
FWE_ALPHA = 2  # RULER's Zipf exponent: with `top` occurrences of the top word, rank r occurs top // r**2 times
# From 18 occurrences of the top word on, ranks 1-4 occur strictly less often one after the other (16 and 17 tie
# ranks 3 and 4), so the three most frequent words are unambiguous.
FWE_MIN_TOP = 18
# Needle keys and the common words come from this text whatever the haystack, so they stay ordinary English words
# (and the samples made before there was a choice of haystack stay as they were).
WORDS_HAYSTACK = "persuasion"
# RULER's task instructions open the context, so they are compressed with it; small models ignore a
# hidden needle without them (SmolLM2 answers "a magical key" instead of the number).
PREAMBLES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.",
    "niah": "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.",
    "variable_tracking": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    "common_words": "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.",
    "frequent_words": "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.",
}


@dataclass(frozen=True)
class Sample:
    task: str
    context: str
    question: str
    answers: list[str]  # all required, matched as whole words, case-insensitively
    max_new_tokens: int
    answer_prefix: str = ""  # RULER's start of the answer; a harness may append it after the prompt
    depth: float | None = None  # where the queried needle (or chain start) sits, 0 = start, 1 = end
    followups: tuple[Question, ...] = ()  # niah_multiturn: asked one per turn after the first, on the same cache
    starts_answer: bool = False  # the prompt ends with answer_prefix (lm-eval's gen_prefix); ours leave it out


@dataclass(frozen=True)
class SampleSet:
    """One task's samples at one context length: what the evaluation runs and reports as one column (ours from
    make_samples, or lm-eval's documents from outside.load_ruler_docs)."""

    context_tokens: int
    label: str
    samples: list[Sample]


@dataclass(frozen=True)
class _Filler:
    """Text cut into words (each keeps its trailing whitespace) that can be cycled from any start."""

    words: tuple[str, ...]
    ends_sentence: tuple[bool, ...]
    sentence_starts: tuple[int, ...]

    @classmethod
    def from_text(cls, text: str) -> _Filler:
        words = tuple(re.findall(r"\S+\s*", text))
        ends = tuple(bool(re.search(r"[.!?][\"']?\s*$", w)) for w in words)
        starts = (0,) + tuple(i + 1 for i, end in enumerate(ends[:-1]) if end)
        return cls(words, ends, starts)

    def render(self, start: int, n: int, needles: list[tuple[float, str]]) -> str:
        """n words from `start` (wrapping), each needle inserted at the sentence end nearest below its depth."""
        size = len(self.words)
        words = [self.words[(start + i) % size] for i in range(n)]
        boundaries = [0] + [i + 1 for i in range(n) if self.ends_sentence[(start + i) % size]]
        placed = sorted(
            ((boundaries[bisect_right(boundaries, depth * n) - 1], k) for k, (depth, _) in enumerate(needles))
        )
        pieces, done = [], 0
        for position, k in placed:
            pieces += words[done:position]
            pieces.append(needles[k][1] + " ")
            done = position
        pieces += words[done:]
        return "".join(pieces).strip()


@cache
def _haystack(name: str) -> _Filler:
    return _Filler.from_text(haystack_text(name))


@cache
def _noise() -> _Filler:
    return _Filler.from_text(NOISE)


@cache
def _vocabulary(name: str) -> tuple[str, ...]:
    """Plain lower-case English words (4+ letters, never capitalised) from haystack text `name`."""
    text = haystack_text(name)
    capitalised = {w.lower() for w in re.findall(r"\b[A-Z][a-z]+\b", text)}
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,}\b", text)) - capitalised))


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _fit(render: Callable[[int], str], tokenizer: Any, target: int, guess: int, max_units: int, task: str) -> str:
    """Find the unit count whose rendering is closest to `target` tokens; render(n) grows with n."""
    n, best = min(max(guess, 0), max_units), None
    for _ in range(12):
        text = render(n)
        length = _count_tokens(tokenizer, text)
        if best is None or abs(length - target) < abs(best[1] - target):
            best = (text, length)
        if abs(length - target) <= _FIT_TARGET * target:
            break
        if n == 0 and length > target:
            raise ValueError(
                f"context_tokens={target} is too small for task {task!r}: its fixed parts alone take {length} tokens"
            )
        # Tokens per unit measured so far; the fixed parts make it an overestimate, so steps undershoot.
        step = round((target - length) * max(n, 1) / length)
        n_next = min(max(n + (step or (1 if length < target else -1)), 0), max_units)
        if n_next == n:
            break
        n = n_next
    text, length = best
    if length < (1 - TOLERANCE) * target and n == max_units:
        raise ValueError(f"context_tokens={target} is too large for task {task!r}: at most ~{length} tokens")
    if abs(length - target) > TOLERANCE * target:
        raise RuntimeError(f"could not fit task {task!r} to {target} tokens (got {length})")
    return text


def _distinct(rng: random.Random, draw: Callable[[], Any], k: int) -> list:
    out: list = []
    while len(out) < k:
        value = draw()
        if value not in out:
            out.append(value)
    return out


def _key(rng: random.Random) -> str:
    vocab = _vocabulary(WORDS_HAYSTACK)
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


def _magic_numbers(rng: random.Random, k: int) -> list[str]:
    return [str(v) for v in _distinct(rng, lambda: rng.randint(1_000_000, 9_999_999), k)]


def _magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _spread(depth: float, k: int) -> list[float]:
    """k depths evenly spaced around the unit circle starting at `depth` (the queried needle first)."""
    return [(depth + j / k) % 1.0 for j in range(k)]


class Question(NamedTuple):
    """What is asked about a context (a sample's later turns, too) and what the answer must contain."""

    question: str
    answer_prefix: str
    answers: list[str]


def _magic_query(keys: list[str], answers: list[str]) -> Question:
    """RULER's question and answer prefix for the magic numbers of `keys`."""
    listed = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"
    if len(answers) == 1:
        return Question(
            f"What is the special magic number for {listed} mentioned in the provided text?",
            f"The special magic number for {listed} mentioned in the provided text is",
            answers,
        )
    return Question(
        f"What are all the special magic numbers for {listed} mentioned in the provided text?",
        f"The special magic numbers for {listed} mentioned in the provided text are",
        answers,
    )


def _listed_query(key: str, value: str) -> Question:
    """niah_multiturn's question form, worded unlike RULER's (and the profiles' calibration questions)."""
    return Question(f"Which number does the text list for {key}?", f"The number listed for {key} is", [value])


def _needles_and_queries(task: str, rng: random.Random, depth: float) -> tuple[list[tuple[float, str]], list[Question]]:
    """Needles (depth, sentence) of a needle task and what is asked about them, one query per turn."""
    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return [(depth, needle)], [Question("What is the pass key?", "The pass key is", [key])]
    if task == "niah_single":
        key, value = _key(rng), _magic_numbers(rng, 1)[0]
        return [(depth, _magic_needle(key, value))], [_magic_query([key], [value])]
    if task == "variable_tracking":
        names = _distinct(rng, lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), VT_HOPS + 1)
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
        # The chain must read in order, so the hops follow the first statement towards the end.
        depths = [depth + (1 - depth) * j / len(chain) for j in range(len(chain))]
        query = Question(
            f"Find all variables that are assigned the value {value} in the text above.",
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:",
            names,
        )
        return list(zip(depths, chain, strict=True)), [query]
    depths = _spread(depth, NUM_NEEDLES)
    values = _magic_numbers(rng, NUM_NEEDLES)
    if task == "niah_multivalue":
        key = _key(rng)
        return [(d, _magic_needle(key, v)) for d, v in zip(depths, values, strict=True)], [_magic_query([key], values)]
    keys = _distinct(rng, lambda: _key(rng), NUM_NEEDLES)
    needles = [(d, _magic_needle(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
    if task == "niah_multiturn":  # one needle per turn, in the order drawn (the first at `depth`)
        return needles, [_listed_query(k, v) for k, v in zip(keys, values, strict=True)]
    if task == "niah_multikey":
        return needles, [_magic_query(keys[:1], values[:1])]
    return needles, [_magic_query(keys, values)]


def _with_preamble(preamble: str, render: Callable[[int], str]) -> Callable[[int], str]:
    return lambda n: f"{preamble}\n\n{render(n)}"


def _needle_sample(task: str, rng: random.Random, depth: float, tokenizer: Any, target: int, haystack: str) -> Sample:
    filler = _haystack(haystack) if task in HAYSTACK_TASKS else _noise()
    needles, (query, *followups) = _needles_and_queries(task, rng, depth)
    start = rng.choice(filler.sentence_starts)
    preamble = PREAMBLES["niah" if task.startswith("niah") else task]
    render = _with_preamble(preamble, lambda n: filler.render(start, n, needles))
    context = _fit(render, tokenizer, target, guess=target * 3 // 4, max_units=10 * target, task=task)
    return Sample(task, context, query.question, query.answers, MAX_NEW_TOKENS[task], query.answer_prefix, depth,
                  tuple(followups))


def _common_words_sample(rng: random.Random, tokenizer: Any, target: int) -> Sample:
    query = Question(
        f"What are the {CWE_NUM_COMMON} most common words in the above list?",
        f"Answer: The top {CWE_NUM_COMMON} words that appear most often in the list are:",
        [],
    )
    # A word of the question itself could be "found" in an output that only echoes the question. Matching ignores
    # case, so the common words also skip words capitalised there ("Answer"); skipping them in `vocab` instead
    # would reshuffle every sample made before.
    asked = re.findall(r"[a-z]+", query.question + query.answer_prefix)
    vocab = [w for w in _vocabulary(WORDS_HAYSTACK) if w not in asked]
    words = rng.sample(vocab, len(vocab))
    echoed = set(re.findall(r"[a-z]+", f"{query.question} {query.answer_prefix}".lower()))
    common = [w for w in words if w not in echoed][:CWE_NUM_COMMON]
    rare = [w for w in words if w not in common]
    # RULER's 30 vs 3 repeats need ~4k tokens; shorter lists scale the common repeats down.
    entries_guess = target // 6
    repeats_common, repeats_rare = (30, 3) if entries_guess >= 600 else (max(2, entries_guess // 20), 1)
    shuffle_seed = rng.random()

    def numbered_list(n_rare: int) -> str:
        entries = common * repeats_common + rare[:n_rare] * repeats_rare
        random.Random(shuffle_seed).shuffle(entries)
        return " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1))

    guess = (entries_guess - CWE_NUM_COMMON * repeats_common) // repeats_rare
    render = _with_preamble(PREAMBLES["common_words"], numbered_list)
    context = _fit(render, tokenizer, target, guess, max_units=len(rare), task="common_words")
    return Sample("common_words", context, query.question, common, MAX_NEW_TOKENS["common_words"], query.answer_prefix)


def _coded_word(rng: random.Random, banned: frozenset[str]) -> str:
    """A random 3-5 letter word (RULER's "coded word") that is not in `banned`."""
    while True:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
        if word not in banned:
            return word


def _frequent_words_sample(rng: random.Random, tokenizer: Any, target: int) -> Sample:
    preamble = PREAMBLES["frequent_words"]
    query = Question(
        "What are the three most frequently appeared words in the above coded text?",
        "Answer: According to the coded text above, the three most frequently appeared words are:",
        [],
    )
    # An answer that is a word of the instructions could be "found" in an output that only echoes them.
    banned = frozenset(re.findall(r"[a-z]+", f"{preamble} {query.question} {query.answer_prefix}".lower()))
    # The fit's unit is one more occurrence of the top word. Ranks beyond isqrt(top) occur 0 times, so these words
    # cover the longest text the fit may try (max_units = target).
    vocab = _distinct(rng, lambda: _coded_word(rng, banned), isqrt(FWE_MIN_TOP + target))
    shuffle_seed = rng.random()

    def coded_text(n: int) -> str:
        top = FWE_MIN_TOP + n
        words = [w for rank, w in enumerate(vocab, 1) for _ in range(top // rank**FWE_ALPHA)]
        random.Random(shuffle_seed).shuffle(words)
        return " ".join(words)

    render = _with_preamble(preamble, coded_text)
    # A unit adds ~1.6 words (zeta(2) = 1.64) of ~3 tokens each.
    context = _fit(render, tokenizer, target, guess=target // 5, max_units=target, task="frequent_words")
    return Sample(
        "frequent_words", context, query.question, vocab[:3], MAX_NEW_TOKENS["frequent_words"], query.answer_prefix
    )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def make_samples(
    task: str, tokenizer: Any, context_tokens: int, n: int, seed: int = 0, haystack: str = "persuasion"
) -> list[Sample]:
    """n samples of `task` whose contexts are context_tokens (+-5%) long; same arguments, same samples.

    `haystack` (one of HAYSTACKS) is the text the niah_* tasks hide their needles in; other tasks ignore it.
    """
    _check_choice("task", task, TASKS)
    _check_choice("haystack", haystack, HAYSTACKS)
    _check_int("context_tokens", context_tokens, 1)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text, add_special_tokens=False) method, got {tokenizer!r}")
    samples = []
    for i in range(n):
        # One generator per sample (string seeds hash stably): sample i does not depend on the others.
        rng = random.Random(f"{task}/{seed}/{i}")
        if task == "common_words":
            samples.append(_common_words_sample(rng, tokenizer, context_tokens))
        elif task == "frequent_words":
            samples.append(_frequent_words_sample(rng, tokenizer, context_tokens))
        else:
            depth = i / (n - 1) if n > 1 else 0.5
            samples.append(_needle_sample(task, rng, depth, tokenizer, context_tokens, haystack))
    return samples


def _contains_word(text: str, answer: str) -> bool:
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", text, re.IGNORECASE) is not None


def score(sample: Sample | Question, generated_text: str) -> float:
    """Fraction of the required answers found in the output (RULER's string_match_all).

    Stricter than RULER's plain substring test: an answer must stand as a whole word, so "123456"
    does not count as found inside "1234567".
    """
    return sum(_contains_word(generated_text, a) for a in sample.answers) / len(sample.answers)
