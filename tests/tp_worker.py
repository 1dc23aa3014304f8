"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), run by torchrun:

    torchrun --nproc-per-node 2 tests/tp_worker.py MODEL_FOLDER PROFILE OUT_DIR INNER

Loads the model with transformers' tp_plan="auto" (gloo on CPU), compiles it with lukv, generates at compression 0
and at 0.8 with PROFILE, and writes what this rank saw to OUT_DIR/rank{r}.json.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from lukv_compile import LUKVCache, Profile

folder, profile_path, out_dir, inner = sys.argv[1:5]
rank = int(os.environ["RANK"])
model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", attn_implementation="sdpa").eval()
compiled = torch.compile(model, backend="lukv", options={"inner": inner})
ids = torch.randint(1, 128, (2, 90), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :17] = 0  # left padding
result = {"rank": rank}
with torch.no_grad():
    for compression in (0.0, 0.8):
        cache = LUKVCache(model.config, profile=Profile.load(profile_path), compression=compression)
        out = compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, do_sample=False)
        result[str(compression)] = {
            "tokens": out.tolist(), "heads": [cache.shard.start, cache.shard.stop], "nbytes": cache.nbytes(),
            "kept": [[[p.tolist() for p in row] for row in layer.kept_positions()] for layer in cache.layers]}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
