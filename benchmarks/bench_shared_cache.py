"""Compress once, ask many: a saved compressed document against re-reading it, on SmolLM2.

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 .venv/bin/python benchmarks/bench_shared_cache.py [--context 8192]

One document (the passkey task's, --context tokens, its question after it), SmolLM2-135M-Instruct fp32 on this
machine's default threads. What a service pays for the first answer token of a new question on a document
it has seen before, three ways:
  loaded      `LUKVCache.load(doc.lukv, model)` (written once by `lukv compress`'s path: compress_context at
              --compression, its default scoring and selection) + the question's prefill on the
              lukv-compiled model (default inner, inductor; compiled by a warm-up before timing);
  re-prefill  what a user runs without lukv: plain transformers (eager, DynamicCache) prefills the whole
              document + question;
  re-compress compress_context on the document again, then the question as for `loaded`.
Each is timed --repeats times (median); the file's bytes are compared with a full cache saved the same way
(compression 0) and with `full_cache_nbytes`. Then --questions questions (the passkey question with different
lead-ins) each get --answer-tokens greedy tokens, from forks of one loaded cache vs from as many separately
loaded caches: the K/V bytes they hold together (`nbytes_together`). One JSON object is printed (--json: also
written to a file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lukv_compile import LUKVCache, compress_context, full_cache_nbytes, nbytes_together, repeat_ids
from lukv_compile.eval.tasks import make_samples
from lukv_compile.models import load_model
from lukv_compile.tools.compress_command import compress_document, question_ids

LEAD_INS = ("", "Please answer briefly. ", "Read carefully. ", "One number only. ", "Quick question: ",
            "From the text above: ", "Think, then answer. ", "Be exact. ")


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def first_token(forward, cache, context: torch.Tensor, question: torch.Tensor) -> int:
    """The first answer token after `question`, continuing `cache` (which holds `context`)."""
    ids = torch.cat([context[0], question])[None]
    return int(forward(ids[:, cache.get_seq_length():], cache=cache).logits[0, -1].argmax())


@torch.no_grad()
def answer(compiled, cache, context: torch.Tensor, question: torch.Tensor, tokens: int) -> torch.Tensor:
    ids = torch.cat([context[0], question])[None]
    return compiled.generate(ids, cache=cache, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--compression", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=8, choices=range(1, len(LEAD_INS) + 1))
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    sample = make_samples("passkey", tokenizer, args.context, 1)[0]
    questions = [question_ids(tokenizer, lead + sample.question) for lead in LEAD_INS[:args.questions]]
    folder = Path(tempfile.mkdtemp())
    compiled = torch.compile(model, backend="lukv")
    warm, warm_ids = compress_document(model, tokenizer, sample.context[:2000], args.compression)
    answer(compiled, warm, warm_ids, questions[0], 3)  # compiles the prefill and decode graphs

    start = time.perf_counter()
    cache, ids = compress_document(model, tokenizer, sample.context, args.compression)
    compress_s = time.perf_counter() - start
    cache.save(folder / "doc.lukv", token_ids=ids)
    full, _ = compress_document(model, tokenizer, sample.context, 0.0, method="prompt")
    full.save(folder / "full.lukv", token_ids=ids)
    del full

    def loaded() -> int:
        return first_token(compiled, LUKVCache.load(folder / "doc.lukv", model), ids, questions[0])

    def re_prefill() -> int:
        return int(model(torch.cat([ids[0], questions[0]])[None], logits_to_keep=1).logits[0, -1].argmax())

    def re_compress() -> int:
        again = LUKVCache(model.config, profile=cache.profile, compression=args.compression)
        compress_context(model, again, ids, repeat_ids(tokenizer, sample.context))
        return first_token(compiled, again, ids, questions[0])

    with torch.no_grad():
        seconds = {name: median_seconds(run, args.repeats)
                   for name, run in (("loaded", loaded), ("re_prefill", re_prefill), ("re_compress", re_compress))}
        tokens = {name: run() for name, run in (("loaded", loaded), ("re_prefill", re_prefill))}

    shared = LUKVCache.load(folder / "doc.lukv", model)
    forks = [shared.fork() for _ in questions]
    apart = [LUKVCache.load(folder / "doc.lukv", model) for _ in questions]
    same = True
    for fork, alone, question in zip(forks, apart, questions, strict=True):
        same &= torch.equal(answer(compiled, fork, ids, question, args.answer_tokens),
                            answer(compiled, alone, ids, question, args.answer_tokens))
    result = {
        "context_tokens": ids.shape[1], "compression": args.compression, "threads": torch.get_num_threads(),
        "compress_context_s": compress_s, "first_token_s": seconds,
        "first_token_vs_re_prefill": {name: seconds["re_prefill"] / s for name, s in seconds.items()},
        "first_tokens": {name: tokenizer.decode([token]) for name, token in tokens.items()},
        "file_bytes": (folder / "doc.lukv").stat().st_size, "full_file_bytes": (folder / "full.lukv").stat().st_size,
        "full_cache_nbytes": full_cache_nbytes(model.config, 1, ids.shape[1], model.dtype),
        "questions": len(questions), "answer_tokens": args.answer_tokens,
        "forks_nbytes_together": nbytes_together(forks), "separate_nbytes": nbytes_together(apart),
        "fork_answers_equal_separate": same,
    }
    result["file_vs_full_file"] = result["file_bytes"] / result["full_file_bytes"]
    result["forks_vs_separate"] = result["forks_nbytes_together"] / result["separate_nbytes"]
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
