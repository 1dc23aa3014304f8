"""Accuracy of the eviction methods on RULER-style tasks, one result per (sample, method, ratio, protocol).

Two engines give the same answers (cross-checked on a subset, see docs/results.md):
- `compiled`: the product path. One compiled model, one LUKVCache per (method, ratio, sample): prefill,
  evict, the question as one forward, greedy decode; memory (`cache.nbytes()`) and decode steps measured.
- `simulated` (simulate.py): one recorded prefill per sample, every method and ratio selecting from the
  same K/V with the runtime's scorers, budgets and selection, decoded together as one batch. Orders of
  magnitude cheaper, and the only engine that runs the `oracle` ceiling.

Protocols: `agnostic` (LU-KV's task-agnostic compression: the context is compressed before the question
is read) and `aware` (the question is part of the compressed prompt). Samples are sharded over the ranks
of a torchrun job (`WORLD_SIZE`); rank 0 gathers the results.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lukv_compile.data import HAYSTACKS
from lukv_compile.eval.methods import (
    FILLED,
    ORACLE,
    RECONSTRUCTED,
    Method,
    ProfileMissingError,
    make_cache,
    parse_methods,
    resolve,
    simulated_only,
)
from lukv_compile.eval.simulate import PROTOCOLS, Variant, simulate_sample
from lukv_compile.eval.tasks import (
    HAYSTACK_TASKS,
    MULTI_QUESTION_TASKS,
    TASKS,
    Sample,
    SampleSet,
    make_samples,
    score,
)
from lukv_compile.models import eos_token_ids
from lukv_compile.profile import check_compression
from lukv_compile.profiling.reconstruction import (
    chat_parts,
    check_prompt_format,
    next_turn,
    reconstruction_utility,
    repeat_ids,
)
from lukv_compile.runtime.cache import LUKVCache, full_cache_nbytes
from lukv_compile.runtime.chunked_prefill import chunked_prefill
from lukv_compile.runtime.compress_context import compress_context, fill_by_utility

ENGINES = ("simulated", "compiled")
DEFAULT_HAYSTACK = HAYSTACKS[0]  # Persuasion: the one every earlier result used
WARMUP_STEPS = 2  # decode steps per sample left out of the latency median (the first may compile)


@dataclass(frozen=True)
class Prompt:
    context_ids: torch.Tensor  # [1, T]: prefilled, then compressed
    question_ids: list[int]  # after compression (agnostic) or the end of the compressed prompt (aware)
    max_new_tokens: int
    reconstruction: list[int]  # the context's reconstruction (`reconstruction.repeat_ids`), for that scorer
    followups: tuple[list[int], ...] = ()  # each later question's turn, after the previous answer


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the answer, without the stop token
    later: list[list[int]]  # the answers to the prompt's follow-up questions, in order
    kv_bytes: int  # cache.nbytes(): kept keys/values plus the room for the decode tokens plus metadata
    full_bytes: int  # an uncompressed cache for the same number of token slots
    step_seconds: list[float]  # every single-token forward of the answer


@dataclass(frozen=True)
class Result:
    """One sample's answer under one method, compression and protocol."""

    engine: str
    protocol: str
    context_tokens: int
    task: str
    sample: int
    method: str
    compression: float
    score: float  # in [0, 1]
    answer: str
    kept: float | None = None  # simulated: fraction of the prompt's K/V kept over all layers and heads
    kv_ratio: float | None = None  # compiled: cache.nbytes() / an uncompressed cache of as many tokens
    decode_ms: float | None = None  # compiled: median single-token step after warm-up
    turns: list[float] | None = None  # a multi-question sample: each question's score (`score` is their mean)

    def as_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer: Any, sample: Sample, prompt_format: str) -> Prompt:
    """Context and question token ids, cut where the question starts.

    `chat` wraps both in the chat template (context first in the user turn, question after a blank
    line); `plain` is the raw context, the question and "Answer:". A sample that starts its answer (lm-eval's
    documents) ends the prompt with its answer_prefix instead (after the assistant turn starts, or in place of
    "Answer:"). Each part is tokenized on its own so the cut is exact.
    """
    check_prompt_format(prompt_format)
    starts = sample.answer_prefix if sample.starts_answer else ""
    if prompt_format == "chat":
        before, question = chat_parts(tokenizer, sample.question)
        context, question = before + sample.context, question + starts
        later = [next_turn(tokenizer, q.question) for q in sample.followups]
    else:
        context, question = sample.context, f"\n\n{sample.question}\n{starts or 'Answer:'}"
        later = [f"\n\n{q.question}\nAnswer:" for q in sample.followups]
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return Prompt(torch.tensor([context_ids]), tokenizer.encode(question, add_special_tokens=False),
                  sample.max_new_tokens, repeat_ids(tokenizer, sample.context, chat=prompt_format == "chat"),
                  tuple(tokenizer.encode(turn, add_special_tokens=False) for turn in later))


@torch.no_grad()
def run_sample(compiled, model, cache: LUKVCache, prompt: Prompt, stop_ids: set[int],
               prefill_chunk: int | None = None, protocol: str = "agnostic",
               fill: Callable[[torch.Tensor], object] | None = None) -> Generation:
    """Prefill + evict (in chunks of `prefill_chunk`, if given; with the question for `aware`), the
    question in one forward (`agnostic`), then greedy decoding until a stop token; then each follow-up question
    in one forward after the answer, on the same cache, and its greedy answer.

    fill: fills the empty cache from the context's ids instead of the compiled prefill (`method_fill`)."""
    device = model.device
    question = torch.tensor([prompt.question_ids], device=device)
    ids = prompt.context_ids.to(device)
    if protocol == "aware":
        ids = torch.cat([ids, question], dim=1)
    if fill is not None:  # the context scored by an uncompiled pass over it, then the compiled model
        fill(ids)
    else:
        logits = chunked_prefill(compiled, cache, ids, chunk=prefill_chunk or ids.shape[1], logits_to_keep=1)
    if protocol == "agnostic":
        logits = compiled(input_ids=question, cache=cache, logits_to_keep=1).logits
    answer, unfed, steps = greedy_answer(compiled, cache, logits, prompt.max_new_tokens, stop_ids)
    later = []
    for turn in prompt.followups:
        logits = compiled(input_ids=torch.tensor([unfed + turn], device=device), cache=cache, logits_to_keep=1).logits
        said, unfed, _ = greedy_answer(compiled, cache, logits, prompt.max_new_tokens, stop_ids)
        later.append(said)
    full = full_cache_nbytes(model.config, 1, cache.get_seq_length() + len(unfed), model.dtype)
    return Generation(answer, later, cache.nbytes(), full, steps)


def greedy_answer(compiled, cache: LUKVCache, logits: torch.Tensor, max_new_tokens: int,
                  stop_ids: set[int]) -> tuple[list[int], list[int], list[float]]:
    """(answer tokens, the answer's last token when the cache has not seen it (a cut answer), every decode step's
    seconds) of greedy decoding from `logits` until a stop token or `max_new_tokens`."""
    next_token = int(logits[0, -1].argmax())
    answer, steps = [], []
    while next_token not in stop_ids and len(answer) < max_new_tokens:
        answer.append(next_token)
        if len(answer) == max_new_tokens:
            return answer, [next_token], steps
        start = time.perf_counter()
        ids = torch.tensor([[next_token]], device=logits.device)
        logits = compiled(input_ids=ids, cache=cache, logits_to_keep=1).logits
        next_token = int(logits[0, -1].argmax())  # .item() syncs, so the step time is the real one
        steps.append(time.perf_counter() - start)
    return answer, [], steps


def check_tasks(tasks: list[str], context_tokens: list[int], engine: str = "simulated",
                haystacks: tuple[str, ...] = (DEFAULT_HAYSTACK,)) -> None:
    """Our generated tasks: known names, lengths and haystacks, and an engine that runs them."""
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks or not tasks:
        raise ValueError(f"unknown task(s) {bad_tasks or '(none given)'}; allowed: {', '.join(TASKS)}")
    if not context_tokens or any(not isinstance(c, int) or c < 64 for c in context_tokens):
        raise ValueError(f"context_tokens must be ints >= 64, got {context_tokens!r}")
    if engine == "simulated" and MULTI_QUESTION_TASKS & set(tasks):
        raise ValueError(f"task(s) {sorted(MULTI_QUESTION_TASKS & set(tasks))} ask questions in later turns on the "
                         "same cache, which only the compiled engine runs: use engine 'compiled'")
    bad_haystacks = [h for h in haystacks if h not in HAYSTACKS]
    if bad_haystacks or not haystacks:
        raise ValueError(f"unknown haystack(s) {bad_haystacks or '(none given)'}; allowed: {', '.join(HAYSTACKS)}")


def check_evaluation(samples: int, compressions: list[float], engine: str = "simulated",
                     protocols: tuple[str, ...] = ("agnostic",)) -> None:
    """What every evaluation needs, whatever its samples' source."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not compressions:
        raise ValueError("compressions is empty")
    for c in compressions:
        check_compression(c)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"unknown protocol(s) {bad or '(none given)'}; allowed: {', '.join(PROTOCOLS)}")


def available_methods(model, names: list[str], engine: str) -> tuple[list[Method], list[str]]:
    """(methods that can run on this model and engine, notes on those skipped: missing profile, oracle)."""
    ok, notes = [], []
    for name in parse_methods(names):
        try:
            method = resolve(name, model)
        except ProfileMissingError as e:
            notes.append(f"skipped {name}: {e}")
            continue
        why = simulated_only(method) if engine == "compiled" else None
        if why is not None:
            notes.append(f"skipped {name}: {why} (simulated engine only)")
            continue
        ok.append(method)
    return ok, notes


def variants(methods: list[Method], compressions: list[float]) -> list[Variant]:
    """(method, compression) pairs; the full cache runs once, at compression 0."""
    return ([Variant(m, 0.0) for m in methods if m.profile is None]
            + [Variant(m, c) for c in compressions for m in methods if m.profile is not None])


def generated_sets(tokenizer, tasks: list[str], context_tokens: list[int], samples: int, seed: int,
                   haystacks: tuple[str, ...]) -> list[SampleSet]:
    """Our tasks' samples: each niah_* task once per haystack, labelled `task@haystack` on any but the default."""
    runs_of_tasks = [(task, haystack) for task in tasks
                     for haystack in (haystacks if task in HAYSTACK_TASKS else (DEFAULT_HAYSTACK,))]
    return [SampleSet(length, task if haystack == DEFAULT_HAYSTACK else f"{task}@{haystack}",
                      make_samples(task, tokenizer, length, samples, seed, haystack))
            for length in context_tokens for task, haystack in runs_of_tasks]


def evaluate(model, tokenizer, methods: list[str], tasks: list[str], context_tokens: list[int], samples: int,
             compressions: list[float], seed: int = 0, progress: bool = True, prompt_format: str = "chat",
             engine: str = "simulated", protocols: tuple[str, ...] = ("agnostic",), inner: str = "inductor",
             compiled=None, prefill_chunk: int | None = None, rank: int = 0, world: int = 1,
             haystacks: tuple[str, ...] = (DEFAULT_HAYSTACK,),
             sample_sets: list[SampleSet] | None = None) -> list[Result]:
    """Results of this rank's samples (sample i runs on rank i % world); methods without a profile are skipped.

    The samples are our tasks' (`tasks` x `context_tokens`, each niah_* task once per haystack) or, given
    `sample_sets` (outside.load_ruler_docs: lm-eval's RULER documents), those instead (then `tasks` is empty).

    `compiled` (compiled engine) is the model compiled with the lukv backend (made here with `inner` if not given).
    """
    if sample_sets is None:
        check_tasks(tasks, context_tokens, engine, haystacks)
    elif tasks:
        raise ValueError(f"give tasks or sample_sets, not both (got tasks {tasks})")
    elif any(len(s.samples) < samples for s in sample_sets):
        short = [f"{s.label}: {len(s.samples)}" for s in sample_sets if len(s.samples) < samples]
        raise ValueError(f"every sample set needs {samples} samples; {', '.join(short)}")
    check_evaluation(samples, compressions, engine, protocols)
    check_prompt_format(prompt_format)
    chosen, notes = available_methods(model, methods, engine)
    if "aware" in protocols and any(m.scorer in RECONSTRUCTED for m in chosen):
        raise ValueError("the reconstruction and kvzip scorings compress the context before the question is seen: "
                         "they run with --protocol agnostic only")
    if engine == "compiled" and "aware" in protocols and any(m.scorer == ORACLE for m in chosen):
        raise ValueError("the compiled engine's oracle fills the cache before the first question from the full "
                         "cache's whole conversation: it runs with --protocol agnostic only (the simulated engine "
                         "runs both)")
    for note in notes if rank == 0 else []:
        print(note)
    runs = variants(chosen, compressions)
    if engine == "compiled" and compiled is None:
        compiled = torch.compile(model, backend="lukv", options={"inner": inner})
    stop_ids = set(eos_token_ids(model, tokenizer))
    if sample_sets is None:
        sample_sets = generated_sets(tokenizer, tasks, context_tokens, samples, seed, haystacks)
    mine = range(rank, samples, world)
    bar = _progress(len(sample_sets) * len(protocols) * len(mine), progress and rank == 0)
    results = []
    for sample_set in sample_sets:
        for index in mine:
            sample = sample_set.samples[index]
            prompt = encode(tokenizer, sample, prompt_format)
            for protocol in protocols:
                bar.set_description(f"{sample_set.context_tokens} {sample_set.label} {protocol}")
                where = (protocol, sample_set.context_tokens, sample_set.label, index)
                if engine == "simulated":
                    results += simulated_results(model, tokenizer, sample, prompt, runs, where, stop_ids)
                else:
                    results += compiled_results(compiled, model, tokenizer, sample, prompt, runs, where,
                                                stop_ids, prefill_chunk)
                bar.update(1)
    bar.close()
    return results


def simulated_results(model, tokenizer, sample: Sample, prompt: Prompt, runs: list[Variant], where: tuple,
                      stop_ids: set[int]) -> list[Result]:
    compressed = [v for v in runs if v.method.profile is not None]
    got = simulate_sample(model, prompt.context_ids[0].tolist(), prompt.question_ids, compressed, where[0],
                          stop_ids, prompt.max_new_tokens, prompt.reconstruction)
    out = []
    for variant in runs:
        if variant.method.profile is None:
            tokens, kept = got.full, 1.0
        else:
            i = compressed.index(variant)
            tokens, kept = got.answers[i], got.kept[i]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        out.append(Result("simulated", *where, variant.method.name, variant.compression, score(sample, text), text,
                          kept=kept))
    return out


def conversation_ids(prompt: Prompt, full: Generation) -> list[int]:
    """What follows the context in the full cache's run: the question, its answer, then each later turn and its
    answer (a cut answer's last token is fed with the next turn, so it is here too)."""
    said = prompt.question_ids + full.tokens
    for turn, answer in zip(prompt.followups, full.later, strict=True):
        said += turn + answer
    return said


def method_fill(method: Method, model, cache: LUKVCache, prompt: Prompt,
                full: Generation | None) -> Callable[[torch.Tensor], object] | None:
    """How a method scored by a pass over the whole context fills its cache (None: the compiled prefill does):
    compress_context's scoring, or the oracle: the utility of the full cache's whole conversation `full`."""
    if method.scorer not in FILLED:
        return None
    if method.scorer in RECONSTRUCTED:
        return lambda ids: compress_context(model, cache, ids, prompt.reconstruction, method.scorer, method.selection)
    said = conversation_ids(prompt, full)
    return lambda ids: fill_by_utility(model, cache, ids, lambda r: reconstruction_utility(model, r, said, pool=1),
                                       method.selection)


def compiled_results(compiled, model, tokenizer, sample: Sample, prompt: Prompt, runs: list[Variant], where: tuple,
                     stop_ids: set[int], prefill_chunk: int | None) -> list[Result]:
    out, full = [], None
    for variant in runs:  # the full cache runs first (`variants`): the oracle knows its conversation
        if variant.method.scorer == ORACLE and full is None:  # not asked for: run it unreported
            full = run_sample(compiled, model, make_cache("full", model, 0.0), prompt, stop_ids, prefill_chunk)
        cache = make_cache(variant.method.name, model, variant.compression)
        g = run_sample(compiled, model, cache, prompt, stop_ids, prefill_chunk, protocol=where[0],
                       fill=method_fill(variant.method, model, cache, prompt, full))
        full = g if variant.method.profile is None else full
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in [g.tokens, *g.later]]
        turns = [score(asked, text) for asked, text in zip([sample, *sample.followups], texts, strict=True)]
        steps = g.step_seconds[WARMUP_STEPS:]
        out.append(Result("compiled", *where, variant.method.name, variant.compression, statistics.mean(turns),
                          " | ".join(texts), kv_ratio=g.kv_bytes / g.full_bytes,
                          decode_ms=1000 * statistics.median(steps) if steps else None,
                          turns=turns if sample.followups else None))
    return out


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="sample", dynamic_ncols=True)
