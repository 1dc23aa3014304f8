"""Where a decode step's time goes: torch.profiler tables of one SmolLM2 token, plain vs lukv.

Plain transformers (eager, DynamicCache) and lukv (aot_eager inner, so every aten op stays visible in
the table; compression 0.8, the shipped SnapKV profile) each prefill the same passkey prompt, take
--warmup decode steps, then --steps profiled steps. Prints the top ops by self CPU time per step.

    python benchmarks/profile_decode.py --context 4096 --threads 1
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from lukv_compile.models import load_model
from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.tools.bench import passkey_prompt, shipped_profile


@torch.no_grad()
def profiled_steps(forward, cache, ids: torch.Tensor, warmup: int, steps: int):
    token = forward(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    for _ in range(warmup):
        token = forward(input_ids=token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = forward(input_ids=token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    ids = tokenizer(passkey_prompt(tokenizer, args.context)[0], return_tensors="pt").input_ids
    runs = {
        "plain": (model, None),
        "lukv": (torch.compile(model, backend="lukv", options={"inner": "aot_eager"}),
                 LUKVCache(model.config, profile=shipped_profile(model), compression=0.8)),
    }
    for name, (forward, cache) in runs.items():
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        prof = profiled_steps(forward, cache, ids, args.warmup, args.steps)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / args.steps / 1000
        print(f"\n### {name}: {ids.shape[1]} prompt tokens, {args.threads} thread(s), "
              f"{total:.1f} ms self CPU per step\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
