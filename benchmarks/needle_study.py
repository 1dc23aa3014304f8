"""Why a method loses to the oracle: does each layer keep the needle's tokens, and what budget does it have?

For RULER samples (task-agnostic protocol: the context alone is compressed), find the context positions
of the answer's tokens (the needle), then for each method report per layer: the fraction of (KV head,
needle token) pairs kept, and the layer's mean keep fraction. Same scorers, budgets and selection as the
evaluation's simulated engine (lukv_compile/eval/simulate.py).

    python benchmarks/needle_study.py --context 1024 --samples 10 --compression 0.8 \
        --methods lukv:keydiff,uniform:keydiff,uniform:oracle,lukv-keydiff:oracle --threads 1

`--profile-dir` reads the lukv budgets' profiles from another folder, as `lukv eval --profile-dir` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from lukv_compile.eval import methods as eval_methods
from lukv_compile.eval.harness import encode
from lukv_compile.eval.methods import parse_methods, resolve
from lukv_compile.eval.simulate import Variant, answer_with_oracle, variant_masks
from lukv_compile.eval.tasks import make_samples
from lukv_compile.models import eos_token_ids, load_model
from lukv_compile.policy.scorers import layer_ropes
from lukv_compile.profile import RECONSTRUCTION
from lukv_compile.profiling.curves import layer_scores
from lukv_compile.profiling.oracle import record_prefill
from lukv_compile.profiling.reconstruction import reconstruction_utility


def needle_positions(context: list[int], answer_ids: list[int]) -> list[int]:
    """Every context position where the answer's token sequence occurs."""
    n = len(answer_ids)
    return [i + j for i in range(len(context) - n + 1) if context[i:i + n] == answer_ids for j in range(n)]


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--tasks", default="passkey,niah_single,niah_multikey")
    p.add_argument("--compression", type=float, default=0.8)
    p.add_argument("--methods", default="lukv:keydiff,uniform:keydiff,uniform:oracle,lukv-keydiff:oracle")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.profile_dir is not None:
        eval_methods.PROFILE_DIR = args.profile_dir
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    methods = [resolve(m, model) for m in parse_methods(args.methods)]
    variants = [Variant(m, args.compression) for m in methods]
    ropes, stop = layer_ropes(model.config), set(eos_token_ids(model, tokenizer))
    kept = {m.name: [] for m in methods}  # per sample: [L] fraction of needle (head, token) pairs kept
    budget = {m.name: [] for m in methods}
    for task in args.tasks.split(","):
        for sample in make_samples(task, tokenizer, args.context, args.samples):
            prompt = encode(tokenizer, sample, "chat")
            context = prompt.context_ids[0].tolist()
            needle = sorted({i for a in sample.answers for i in needle_positions(
                context, tokenizer.encode(a, add_special_tokens=False))})
            if not needle:
                continue
            record = record_prefill(model, prompt.context_ids)
            scores = {}  # the reconstruction first: the oracle's answer below extends the recorded cache
            if any(m.scorer == RECONSTRUCTION for m in methods):
                scores[RECONSTRUCTION] = reconstruction_utility(model, record, prompt.reconstruction)
            _, importance = answer_with_oracle(model, record, prompt.question_ids, "agnostic", stop,
                                               sample.max_new_tokens)
            ranked = {m.scorer for m in methods} - {"oracle", RECONSTRUCTION}
            scores |= {s: layer_scores(s, record.q, record.k, record.v, record.scaling, ropes) for s in ranked}
            scores["oracle"] = importance
            masks = variant_masks(variants, scores, len(context))  # [R, L, H, P]
            for m, mask in zip(methods, masks, strict=True):
                kept[m.name].append(mask[..., needle].float().mean(dim=(1, 2)).numpy())
                budget[m.name].append(mask.float().mean(dim=(1, 2)).numpy())
    layers = model.config.num_hidden_layers
    names = [m.name for m in methods]
    print(f"needle tokens kept per layer (fraction of KV heads x needle tokens), context {args.context}, "
          f"compression {args.compression:g}, {len(kept[names[0]])} samples")
    print("| layer | " + " | ".join(f"{n} kept | {n} budget" for n in names) + " |")
    print("|---:|" + "---:|---:|" * len(names))
    for layer in range(layers):
        cells = " | ".join(f"{np.mean([k[layer] for k in kept[n]]):.2f} | {np.mean([b[layer] for b in budget[n]]):.2f}"
                           for n in names)
        print(f"| {layer} | {cells} |")
    total = " | ".join(f"{np.mean(kept[n]):.2f} | {np.mean(budget[n]):.2f}" for n in names)
    print(f"| all | {total} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
