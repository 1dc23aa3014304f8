"""Host cost of one decode step of `lukv::attend` over 30 SmolLM2-shaped layers (no model weights).

    OMP_NUM_THREADS=1 python benchmarks/bench_attend_op.py --context 1024

Each layer of a LUKVCache (shipped SnapKV profile, compression 0.8) takes a random prompt of `--context`
tokens, then decode steps call the op as the compiled graph does: append one token per KV head, attend
each head's GQA group over its own segment, storage growth included. Prints the mean ms per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig

from lukv_compile.eval.methods import PROFILE_DIR
from lukv_compile.profile import Profile
from lukv_compile.runtime.cache import LUKVCache

SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=64)


def decode_step(cache: LUKVCache, scale: float) -> None:
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
    for layer in cache.layers:
        torch.ops.lukv.attend(q, k, v, None, False, layer.handle, layer.layer_idx, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = Profile.load(PROFILE_DIR / "smollm2-135m-instruct-snapkv.safetensors")
    cache = LUKVCache(LlamaConfig(**SMOLLM2), profile=profile, compression=0.8, allow_other_model=True)
    scale, t = 64**-0.5, args.context
    with torch.no_grad():
        for layer in cache.layers:
            layer.attend(torch.randn(1, 9, t, 64), torch.randn(1, 3, t, 64), torch.randn(1, 3, t, 64), None, True,
                         scale)
        for _ in range(5):
            decode_step(cache, scale)
        start = time.perf_counter()
        for _ in range(args.steps):
            decode_step(cache, scale)
    print(f"context {t}: {1000 * (time.perf_counter() - start) / args.steps:.2f} ms per decode step (30 layers)")


if __name__ == "__main__":
    main()
