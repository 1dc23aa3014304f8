"""Tensor parallelism on torch.distributed: a tiny Llama with 4 KV heads under `torchrun --nproc-per-node 2` (gloo on
CPU, transformers' tp_plan="auto"), compiled with lukv's defaults (inductor). Each rank holds its 2 KV heads with its
block of the profile's budgets: the tokens equal the single-process model's, and each rank keeps exactly the tokens
the single-process cache keeps for its heads."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_masked_simulation import skewed_profile
from tiny_models import tiny_model

from lukv_compile import LUKVCache, Profile

WORKER = Path(__file__).with_name("tp_worker.py")


def four_head_profile() -> Profile:
    """Budgets that differ by head and put more on the second pair of heads (rank 1) than on the first."""
    skewed = skewed_profile("snapkv", 2)
    return Profile(np.concatenate([skewed.prune, skewed.prune[:, :, ::-1] * 0.5], axis=2), scorer="snapkv", sink=4,
                   window=8)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=4, head_dim=16, seed=3)
    model.save_pretrained(tmp_path / "model")
    four_head_profile().save(tmp_path / "profile.safetensors")
    run = subprocess.run([torchrun, "--nproc-per-node", "2", str(WORKER), str(tmp_path / "model"),
                          str(tmp_path / "profile.safetensors"), str(tmp_path), "inductor"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "more KV on the fullest rank" in run.stderr and "--shards 2" in run.stderr  # said, with the fix
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    ids = torch.randint(1, 128, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for compression in ("0.0", "0.8"):
            cache = LUKVCache(model.config, profile=four_head_profile(), compression=float(compression))
            out = compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6,
                                    do_sample=False)
            if compression == "0.0":
                assert torch.equal(out, plain)
            kept = [[[p.tolist() for p in row] for row in layer.kept_positions()] for layer in cache.layers]
            for rank in ranks:
                got = rank[compression]
                assert got["tokens"] == out.tolist()
                start, stop = got["heads"]
                assert (start, stop) == (2 * rank["rank"], 2 * rank["rank"] + 2)
                assert got["kept"] == [[row[start:stop] for row in layer] for layer in kept]
    held = [rank["0.8"]["nbytes"] for rank in ranks]
    assert held[1] > 1.5 * held[0]  # the unbalanced profile: rank 1 holds the heads that keep more
