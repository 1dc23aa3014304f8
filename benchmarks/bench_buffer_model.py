"""Decode speed and KV bytes of SmolLM2 in a gpt-fast-style module: lukv at 0.8 vs inductor on its own buffers.

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 .venv/bin/python benchmarks/bench_buffer_model.py [--contexts 1024 4096 8192]

The module is examples/gpt_fast_style.py with SmolLM2's weights (fp32, batch 1). The baseline is what a gpt-fast
user runs: `torch.compile(model)` (inductor) over the module's dense `[1, 3, S_max, 64]` buffers per layer. lukv
is `torch.compile(model, backend="lukv", options={"compression": 0.8, "profile": <shipped SnapKV LU-KV profile>})`
(default inner: inductor). Per context: prefill once (compile excluded: a warm-up generate of the same shapes
runs first), then `--steps` greedy decode steps; one JSON line per variant with the median decode step, tokens/s
and the KV bytes held after decoding (the dense buffers' storage for the baseline, `buffer_cache().nbytes()` plus
whatever the dense buffers still hold for lukv). Both variants run in this process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gpt_fast_style as gfs  # noqa: E402

import lukv_compile  # noqa: E402
from lukv_compile.eval.methods import profile_path  # noqa: E402
from lukv_compile.models import load_model  # noqa: E402


@torch.no_grad()
def decode_steps(run, model: gfs.Transformer, ids: torch.Tensor, steps: int) -> list[float]:
    """Prefill `ids`, then time `steps` greedy decode steps (seconds each)."""
    length = ids.shape[1]
    model.setup_caches(1, length + steps + 1)
    token = run(ids, torch.arange(length))[:, -1:].argmax(-1)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        token = run(token, torch.tensor([length + step]))[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return times


def kv_bytes(run, model: gfs.Transformer, lukv: bool) -> int:
    """K/V bytes held: the model's dense buffers, plus lukv's cache for the lukv variant."""
    return gfs.dense_kv_bytes(model) + (lukv_compile.buffer_cache(run).nbytes() if lukv else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--compression", type=float, default=0.8)
    args = parser.parse_args()
    hf_model, _ = load_model("smollm2")
    model = gfs.from_transformers(hf_model)
    variants = {  # name -> (compiled model, whether lukv serves it)
        "inductor on its own buffers": (torch.compile(model), False),
        f"lukv {args.compression}": (torch.compile(model, backend="lukv", options={
            "compression": args.compression, "profile": profile_path(hf_model, "snapkv")}), True),
    }
    torch.manual_seed(0)
    for context in args.contexts:
        ids = torch.randint(100, 40000, (1, context))
        for name, (run, lukv) in variants.items():
            decode_steps(run, model, ids, 2)  # compile this context's graphs (S_max changes the buffer shapes)
            times = decode_steps(run, model, ids, args.steps)
            step, held = statistics.median(times), kv_bytes(run, model, lukv)
            print(json.dumps({"variant": name, "context": context, "decode_step_ms": round(1000 * step, 1),
                              "tokens_per_s": round(1 / step, 1), "kv_mib": round(held / 2**20, 2)}), flush=True)


if __name__ == "__main__":
    main()
