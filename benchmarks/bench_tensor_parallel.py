"""Tensor parallelism on CPU: each rank's KV bytes and decode-step times with a profile solved for one process and
with one solved for the shard count (issue 30), and the tokens against the same cases in one process.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 3 benchmarks/bench_tensor_parallel.py --json tp3.json
    OMP_NUM_THREADS=2 python benchmarks/bench_tensor_parallel.py --json one.json     # the same cases, one process
    python benchmarks/bench_tensor_parallel.py --compare tp3.json one.json           # the table for docs/

SmolLM2-135M-Instruct fp32 (3 KV heads: one per rank at 3 ranks) loaded with transformers' tp_plan="auto" (gloo),
compiled with lukv's defaults. --samples passkey documents of --context tokens (chat-framed, the task-agnostic
protocol: the document compressed before its question), greedy --new-tokens. Cases: `full` (compression 0),
`unbalanced` (the shipped LU-KV KeyDiff profile, solved for one process), `balanced` (the same calibration
solved with `lukv profile smollm2 --scorer keydiff --shards 3`) and `default` (no profile given: the one the cache
finds for the model and its shard count), all at --compression. Per rank: K/V bytes held
after the answer (`cache.nbytes()`), kept tokens, and the median single-token decode step. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from lukv_compile import LUKVCache, Profile
from lukv_compile.eval.harness import encode, run_sample
from lukv_compile.eval.tasks import make_samples
from lukv_compile.models import eos_token_ids, load_model
from lukv_compile.profiles import shards_of

PROFILES = Path(__file__).resolve().parent.parent / "lukv_compile" / "profiles"
UNBALANCED = PROFILES / "smollm2-135m-instruct-keydiff.safetensors"
BALANCED = PROFILES / "smollm2-135m-instruct-keydiff-tp3.safetensors"
WARMUP_STEPS = 2  # left out of the step median: the first steps may compile


def cases(compression: float) -> dict[str, dict]:
    """`default`: no profile given, so the cache finds the model's own (under TP: the one solved for the ranks)."""
    return {"full": {"compression": 0.0, "profile": UNBALANCED},
            "unbalanced": {"compression": compression, "profile": UNBALANCED},
            "balanced": {"compression": compression, "profile": BALANCED},
            "default": {"compression": compression, "profile": None}}


def kept_tokens(cache: LUKVCache) -> int:
    return sum(len(p) for layer in cache.layers for row in layer.kept_positions() for p in row)


@torch.no_grad()
def run_rank(args) -> dict:
    """This process's tokens, bytes, kept tokens and decode-step medians per case and sample."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = load_model("smollm2", tp_plan="auto" if world > 1 else None)
    compiled = torch.compile(model, backend="lukv")
    stop = set(eos_token_ids(model, tokenizer))
    prompts = [encode(tokenizer, s, "chat") for s in make_samples("passkey", tokenizer, args.context, args.samples)]
    prompts = [replace(p, max_new_tokens=args.new_tokens) for p in prompts]
    run_sample(compiled, model, LUKVCache(model.config, compression=0.0), prompts[0], stop)  # compile first
    out = {}
    for name, settings in cases(args.compression).items():
        rows = []
        for prompt in prompts:
            profile = settings["profile"] and Profile.load(settings["profile"])
            cache = LUKVCache(model.config, profile=profile, compression=settings["compression"])
            got = run_sample(compiled, model, cache, prompt, stop)
            steps = got.step_seconds[WARMUP_STEPS:]
            rows.append({"tokens": got.tokens, "nbytes": got.kv_bytes, "kept": kept_tokens(cache),
                         "profile_shards": shards_of(cache.profile),
                         "step_ms": 1000 * statistics.median(steps) if steps else None})
        out[name] = rows
    return out


def gather(mine: dict) -> list[dict]:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return [mine]
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def share_line(values: list[float]) -> str:
    total = sum(values)
    return " / ".join(f"{v / total:.1%}" for v in values)


def compare(sharded_path: str, single_path: str) -> None:
    """A markdown table: per case, tokens equal to one process, each rank's share of bytes and kept tokens, the
    fullest rank over the emptiest, and the decode-step medians per rank."""
    sharded, single = (json.loads(Path(p).read_text()) for p in (sharded_path, single_path))
    ranks = sharded["ranks"]
    print("| case | tokens == one process | bytes per rank (share) | kept tokens per rank (share) | fullest / "
          "emptiest | decode step per rank (ms) | one process step (ms) |\n|---|---|---|---|---|---|---|")
    for name in sharded["cases"]:
        equal = sum(a["tokens"] == b["tokens"] for a, b in zip(ranks[0][name], single["ranks"][0][name], strict=True))
        nbytes = [sum(r["nbytes"] for r in rank[name]) for rank in ranks]
        kept = [sum(r["kept"] for r in rank[name]) for rank in ranks]
        steps = [statistics.median(r["step_ms"] for r in rank[name]) for rank in ranks]
        one = statistics.median(r["step_ms"] for r in single["ranks"][0][name])
        print(f"| {name} | {equal} of {len(ranks[0][name])} | {share_line(nbytes)} | {share_line(kept)} | "
              f"{max(kept) / min(kept):.2f}x | {' / '.join(f'{s:.1f}' for s in steps)} | {one:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1024, help="document tokens (default 1024)")
    p.add_argument("--samples", type=int, default=3, help="passkey documents (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy answer tokens (default 32)")
    p.add_argument("--compression", type=float, default=0.8, help="compression of the LU-KV cases (default 0.8)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--compare", nargs=2, metavar=("SHARDED", "SINGLE"), help="print the table of two runs' JSON")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    ranks = gather(run_rank(args))
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"context": args.context, "compression": args.compression, "cases": list(ranks[0]), "ranks": ranks}
        text = json.dumps(result)
        if args.json:
            Path(args.json).write_text(text)
        print(json.dumps({name: [[r["nbytes"] for r in rank[name]] for rank in ranks] for name in ranks[0]}))


if __name__ == "__main__":
    main()
