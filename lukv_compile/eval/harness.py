"""Accuracy, memory and decode latency of every method from one loop over one compiled model.

The protocol is LU-KV's (task-agnostic compression): prefill the context alone, evict each KV head to
its budget, and only then read the question as one forward over the kept context (exact causal
semantics: the question attends to the kept context and to itself), then decode the answer greedily.
Each decode step is timed for latency and the same cache is measured for memory.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lukv_compile.cache import LUKVCache, full_cache_nbytes
from lukv_compile.eval.methods import ProfileMissingError, make_cache, parse_methods
from lukv_compile.eval.tasks import TASKS, Sample, make_samples, score
from lukv_compile.models import eos_token_ids
from lukv_compile.prefill import chunked_prefill
from lukv_compile.profile import check_compression

PROMPT_FORMATS = ("chat", "plain")
WARMUP_STEPS = 2  # decode steps per sample left out of the latency median (the first may compile)
_CONTEXT_MARK = "\x00CONTEXT\x00"


@dataclass(frozen=True)
class Prompt:
    context_ids: torch.Tensor  # [1, T]: prefilled, then compressed
    question_ids: list[int]  # one forward after compression
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    tokens: list[int]  # the answer, without the stop token
    kv_bytes: int  # cache.nbytes(): kept keys/values plus the room for the decode tokens plus metadata
    full_bytes: int  # an uncompressed cache for the same number of token slots
    step_seconds: list[float]  # every single-token forward of the answer


@dataclass(frozen=True)
class Row:
    method: str
    compression: float
    task: str
    context_tokens: int
    score: float  # mean over samples, in [0, 1]
    n: int
    kv_bytes: float  # mean over samples
    kv_ratio: float  # mean of kv_bytes / full-cache bytes at the same token count
    decode_ms: float  # median single-token decode step after warm-up

    def as_dict(self) -> dict:
        return asdict(self)


def encode(tokenizer: Any, sample: Sample, prompt_format: str) -> Prompt:
    """Context and question token ids, cut where the question starts.

    `chat` wraps both in the chat template (context first in the user turn, question after a blank
    line); `plain` is the raw context, the question and "Answer:". Each part is tokenized on its own so
    the cut is exact.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    question = f"\n\n{sample.question}"
    if prompt_format == "chat":
        template = tokenizer.apply_chat_template([{"role": "user", "content": _CONTEXT_MARK + question}],
                                                 tokenize=False, add_generation_prompt=True)
        before, after = template.split(_CONTEXT_MARK)
        context, question = before + sample.context, after
    else:
        context, question = sample.context, question + "\nAnswer:"
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return Prompt(torch.tensor([context_ids]), tokenizer.encode(question, add_special_tokens=False),
                  sample.max_new_tokens)


@torch.no_grad()
def run_sample(compiled, model, cache: LUKVCache, prompt: Prompt, stop_ids: set[int],
               prefill_chunk: int | None = None) -> Generation:
    """Prefill + evict (in chunks of `prefill_chunk`, if given), the question in one forward, then greedy
    decoding until a stop token."""
    device = model.device
    chunked_prefill(compiled, cache, prompt.context_ids.to(device), chunk=prefill_chunk or prompt.context_ids.shape[1],
                    logits_to_keep=1)
    question = torch.tensor([prompt.question_ids], device=device)
    next_token = int(compiled(input_ids=question, cache=cache, logits_to_keep=1).logits[0, -1].argmax())
    answer, steps = [], []
    while next_token not in stop_ids and len(answer) < prompt.max_new_tokens:
        answer.append(next_token)
        if len(answer) == prompt.max_new_tokens:
            break
        start = time.perf_counter()
        logits = compiled(input_ids=torch.tensor([[next_token]], device=device), cache=cache, logits_to_keep=1).logits
        next_token = int(logits[0, -1].argmax())  # .item() syncs, so the step time is the real one
        steps.append(time.perf_counter() - start)
    tokens = prompt.context_ids.shape[1] + len(prompt.question_ids) + len(answer)
    full = full_cache_nbytes(model.config, 1, tokens, model.dtype)
    return Generation(answer, cache.nbytes(), full, steps)


def check_evaluation(tasks: list[str], context_tokens: list[int], samples: int, compressions: list[float]) -> None:
    bad_tasks = [t for t in tasks if t not in TASKS]
    if bad_tasks or not tasks:
        raise ValueError(f"unknown task(s) {bad_tasks or '(none given)'}; allowed: {', '.join(TASKS)}")
    if not context_tokens or any(not isinstance(c, int) or c < 64 for c in context_tokens):
        raise ValueError(f"context_tokens must be ints >= 64, got {context_tokens!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not compressions:
        raise ValueError("compressions is empty")
    for c in compressions:
        check_compression(c)


def available_methods(model, methods: list[str]) -> tuple[list[str], list[str]]:
    """(methods that can run on this model, notes on those skipped because their profile is missing)."""
    ok, notes = [], []
    for method in parse_methods(methods):
        try:
            make_cache(method, model, 0.5)
            ok.append(method)
        except ProfileMissingError as e:
            notes.append(f"skipped {method}: {e}")
    return ok, notes


def method_runs(methods: list[str], compressions: list[float]) -> list[tuple[str, float]]:
    """(method, compression) pairs; the full cache runs once, at compression 0."""
    return [(m, 0.0) for m in methods if m == "full"] + [(m, c) for m in methods if m != "full" for c in compressions]


def summarize(method: str, compression: float, task: str, context_tokens: int,
              scores: list[float], generations: list[Generation]) -> Row:
    steps = [s for g in generations for s in g.step_seconds[WARMUP_STEPS:]]
    return Row(method, compression, task, context_tokens, statistics.fmean(scores), len(scores),
               statistics.fmean(g.kv_bytes for g in generations),
               statistics.fmean(g.kv_bytes / g.full_bytes for g in generations),
               1000 * statistics.median(steps) if steps else float("nan"))


def evaluate(model, tokenizer, methods: list[str], tasks: list[str], context_tokens: list[int], samples: int,
             compressions: list[float], seed: int = 0, progress: bool = True, prompt_format: str = "chat",
             inner: str = "inductor", compiled=None, prefill_chunk: int | None = None) -> list[Row]:
    """One Row per (method, compression, task, context length); methods without a profile are skipped.

    `compiled` is the model compiled with the lukv backend (made here with `inner` if not given).
    """
    check_evaluation(tasks, context_tokens, samples, compressions)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    methods, notes = available_methods(model, methods)
    for note in notes:
        print(note)
    if compiled is None:
        compiled = torch.compile(model, backend="lukv", options={"inner": inner})
    runs = method_runs(methods, compressions)
    stop_ids = set(eos_token_ids(model, tokenizer))
    bar = _progress(len(context_tokens) * len(tasks) * len(runs) * samples, progress)
    rows = []
    for length in context_tokens:
        for task in tasks:
            task_samples = make_samples(task, tokenizer, length, samples, seed)
            prompts = [encode(tokenizer, s, prompt_format) for s in task_samples]
            for method, compression in runs:
                bar.set_description(f"{length} {task} {method} {compression:g}")
                scores, generations = [], []
                for sample, prompt in zip(task_samples, prompts, strict=True):
                    generation = run_sample(compiled, model, make_cache(method, model, compression), prompt,
                                            stop_ids, prefill_chunk)
                    scores.append(score(sample, tokenizer.decode(generation.tokens, skip_special_tokens=True)))
                    generations.append(generation)
                    bar.update(1)
                rows.append(summarize(method, compression, task, length, scores, generations))
    bar.close()
    return rows


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="sample", dynamic_ncols=True)
