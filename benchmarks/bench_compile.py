"""First-call compile time of the lukv backend on a real model, cold or warm (one process per run).

A prompt forward and one decode step on a fresh compiled model, then the same two calls again on a new
cache: compile seconds = the first two calls minus the second two. `--warm` loads the artifacts an
earlier `--save` run wrote (lukv_compile/compiler/warm_start.py) before compiling. Run each in its own process; point
TORCHINDUCTOR_CACHE_DIR at a fresh folder to leave inductor's on-disk cache out of it.

    python benchmarks/bench_compile.py --inner inductor --save    # cold, writes the artifacts
    python benchmarks/bench_compile.py --inner inductor --warm    # warm from them
    python benchmarks/bench_compile.py --inner inductor --regional   # one decoder layer compiled, shared
"""

from __future__ import annotations

import argparse
import time


def forward_pair(compiled, config, ids) -> float:
    """Seconds of a prompt forward then one decode step, on a new cache."""
    import torch

    from lukv_compile import LUKVCache

    cache, start = LUKVCache(config), time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache)
        compiled(input_ids=ids[:, -1:], attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long), cache=cache)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--warm", action="store_true", help="load the saved compile artifacts first")
    parser.add_argument("--save", action="store_true", help="save the compile artifacts afterwards")
    parser.add_argument("--regional", action="store_true", help="options regional=True: compile one decoder layer")
    args = parser.parse_args()

    import torch

    from lukv_compile import save_warm_start, warm_start
    from lukv_compile.models import load_model

    model, _ = load_model(args.model)
    loaded = warm_start(model) if args.warm else None
    ids = torch.randint(100, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="lukv", options={"inner": args.inner, "regional": args.regional})
    first = forward_pair(compiled, model.config, ids)
    again = forward_pair(compiled, model.config, ids)
    saved = save_warm_start(model) if args.save else None
    scope = "regional" if args.regional else "whole model"
    print(f"{args.model} inner {args.inner}, {scope}: first prompt + decode {first:.1f} s, again {again:.1f} s, "
          f"compile {first - again:.1f} s; artifacts loaded from {loaded}, saved to {saved}")


if __name__ == "__main__":
    main()
