"""compress_context's cost by scoring and selection, against a plain prefill of the same document, on SmolLM2.

    .venv/bin/python benchmarks/bench_compress_scoring.py [--context 1024] [--repeats 3]

The passkey task's document framed as `lukv compress` frames it; a plain eager prefill (transformers, no cache
kept) and `compress_context` with each (scoring, selection) pair, median of --repeats wall times each, 2 threads.
"""

from __future__ import annotations

import argparse

import torch
from bench_shared_cache import median_seconds  # run as a script: benchmarks/ is on the path

import lukv_compile
from lukv_compile.config import kv_shape
from lukv_compile.eval.tasks import make_samples
from lukv_compile.models import load_model
from lukv_compile.profiling.reconstruction import repeat_ids
from lukv_compile.tools.compress_command import document_ids

PAIRS = (("reconstruction", "budgets"), ("kvzip", "global"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="document length in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2")
    sample = make_samples("passkey", tokenizer, args.context, 1, seed=0)[0]
    ids, reconstruction = document_ids(tokenizer, sample.context), repeat_ids(tokenizer, sample.context)
    profile = lukv_compile.Profile.uniform(*kv_shape(model.config)[:2], scorer="reconstruction")
    with torch.no_grad():
        plain = median_seconds(lambda: model(ids, logits_to_keep=1), args.repeats)
    print(f"{ids.shape[1]} tokens: plain prefill {plain:.2f} s")
    for scoring, selection in PAIRS:
        def compress(scoring: str = scoring, selection: str = selection) -> None:
            cache = lukv_compile.LUKVCache(model.config, profile=profile, compression=0.8)
            lukv_compile.compress_context(model, cache, ids, reconstruction, scoring, selection)

        seconds = median_seconds(compress, args.repeats)
        print(f"compress_context {scoring} / {selection}: {seconds:.2f} s ({seconds / plain:.1f}x the plain prefill)")


if __name__ == "__main__":
    main()
