"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), run by torchrun:

    torchrun --nproc-per-node 2 tests/tp_worker.py MODEL_FOLDER PROFILE BALANCED_PROFILE OUT_DIR INNER

Loads the model with transformers' tp_plan="auto" (gloo on CPU), compiles it with lukv, runs each of CASES
(compression 0; 0.8; 0.8 with chunked prefill and a second turn, evicting every turn: with PROFILE; 0.8 with
BALANCED_PROFILE, solved for 2 shards), and writes what this rank saw to OUT_DIR/rank{r}.json. The test runs the
same cases in one process (`run_cases`). A profile given as "uniform" is uniform budgets.
"""

import json
import os
import sys

import torch

from lukv_compile import LUKVCache, Profile
from lukv_compile.runtime.layer import RaggedLayer

CASES = {"0.0": {"compression": 0.0}, "0.8": {"compression": 0.8},
         "0.8 chunked, two turns": {"compression": 0.8, "prefill_chunk": 32, "evict": "turn"},
         "0.8 balanced": {"compression": 0.8, "balanced": True}}


def conversation(forward, cache, turns: int) -> torch.Tensor:
    """A left-padded batch of 2, then `turns` generates on one cache, each after 7 more user tokens (the first: the
    prompt alone)."""
    ids = torch.randint(1, 128, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding
    for turn in range(turns):
        if turn:
            said = torch.randint(1, 128, (ids.shape[0], 7), generator=torch.Generator().manual_seed(turn))
            ids = torch.cat([ids, said], dim=1)
            mask = torch.cat([mask, torch.ones_like(said)], dim=1)
        ids = forward.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False)
        mask = torch.cat([mask, torch.ones_like(ids[:, mask.shape[1]:])], dim=1)
    return ids


@torch.no_grad()
def run_cases(model, compiled, profile: Profile | str, balanced: Profile | str) -> dict:
    """Each case's tokens, KV heads held, bytes and kept positions per layer, row and head."""
    result = {}
    for name, case in CASES.items():
        settings = {k: v for k, v in case.items() if k != "balanced"}
        cache = LUKVCache(model.config, profile=balanced if case.get("balanced") else profile, **settings)
        out = conversation(compiled, cache, 2 if "two turns" in name else 1)
        heads = [0, cache.num_kv_heads] if cache.shard is None else [cache.shard.start, cache.shard.stop]
        result[name] = {
            "tokens": out.tolist(), "heads": heads, "nbytes": cache.nbytes(),
            "kept": [[[p.tolist() for p in row] for row in layer.kept_positions()] for layer in cache.layers
                     if isinstance(layer, RaggedLayer)]}
    return result


if __name__ == "__main__":
    from transformers import AutoModelForCausalLM

    folder, profile_path, balanced_path, out_dir, inner = sys.argv[1:6]
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", attn_implementation="sdpa").eval()
    compiled = torch.compile(model, backend="lukv", options={"inner": inner})
    rank = int(os.environ["RANK"])
    profiles = [path if path == "uniform" else Profile.load(path) for path in (profile_path, balanced_path)]
    result = {"rank": rank, **run_cases(model, compiled, *profiles)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
