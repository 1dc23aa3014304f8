"""Tensor parallelism on torch.distributed: a tiny Llama with 4 KV heads under `torchrun --nproc-per-node 2` (gloo on
CPU, transformers' tp_plan="auto"), compiled with lukv's defaults (inductor). Each rank holds its 2 KV heads with its
block of the profile's budgets: the tokens equal the single-process model's, and each rank keeps exactly the tokens
the single-process cache keeps for its heads (a prompt; chunked prefill and a second turn)."""

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
from tp_worker import conversation, run_cases

from lukv_compile import Profile

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

    with torch.no_grad():
        plain = conversation(model, None, 1)
    alone = run_cases(model, torch.compile(model, backend="lukv", options={"inner": "aot_eager"}),
                      four_head_profile())
    assert alone["0.0"]["tokens"] == plain.tolist()
    for name, want in alone.items():
        for rank in ranks:
            got = rank[name]
            start, stop = got["heads"]
            assert (start, stop) == (2 * rank["rank"], 2 * rank["rank"] + 2)
            assert got["tokens"] == want["tokens"], name
            assert got["kept"] == [[row[start:stop] for row in layer] for layer in want["kept"]], name
    held = [rank["0.8"]["nbytes"] for rank in ranks]
    assert held[1] > 1.5 * held[0]  # the unbalanced profile: rank 1 holds the heads that keep more


SPLIT_HEADS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto", attn_implementation="sdpa").eval()
compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
try:
    compiled.generate(torch.arange(1, 50)[None], max_new_tokens=2)
except ValueError as e:
    print("refused:", e)
"""


@pytest.mark.slow
def test_more_ranks_than_kv_heads_is_refused_before_work(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    tiny_model("llama", layers=2, q_heads=4, kv_heads=1, head_dim=16).save_pretrained(tmp_path / "model")
    (tmp_path / "split.py").write_text(SPLIT_HEADS)
    run = subprocess.run([torchrun, "--nproc-per-node", "2", str(tmp_path / "split.py"), str(tmp_path / "model")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("refused: lukv: this tensor-parallel model splits its 1 KV head(s) across 2 ranks") == 2
