"""Tensor parallelism on torch.distributed: a tiny Llama with 4 KV heads under `torchrun --nproc-per-node 2` (gloo on
CPU, transformers' tp_plan="auto"), compiled with lukv's defaults (inductor). Each rank holds its 2 KV heads with its
block of the profile's budgets: the tokens equal the single-process model's, and each rank keeps exactly the tokens
the single-process cache keeps for its heads (a prompt; chunked prefill and a second turn). A profile the solver
balanced for 2 shards keeps each rank's bytes within 5% of the other's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_masked_simulation import skewed_profile
from tiny_models import tiny_gemma3, tiny_model
from tp_worker import conversation, run_cases

from lukv_compile import Profile, solver
from lukv_compile.profiles import PROFILE_DIR_ENV
from lukv_compile.profiling.run import mean_fractions, prune_fractions

WORKER = Path(__file__).with_name("tp_worker.py")


def four_head_profile() -> Profile:
    """Budgets that differ by head and put more on the second pair of heads (rank 1) than on the first."""
    skewed = skewed_profile("snapkv", 2)
    return Profile(np.concatenate([skewed.prune, skewed.prune[:, :, ::-1] * 0.5], axis=2), scorer="snapkv", sink=4,
                   window=8)


def solved_profile(shards: int) -> Profile:
    """Budgets the solver gives 2 layers x 4 KV heads whose loss curves make rank 1's heads (2, 3) worth more,
    solved for one process or balanced over `shards` shards."""
    tokens, sink, window = 90, 4, 8
    evictable = np.arange(tokens - sink - window + 1) / (tokens - sink - window)
    weights = np.array([1, 2, 8, 16, 2, 1, 12, 6], float)  # (layer, head) order
    graph = solver.build_head_graph(2, 4, 4, excluded_layers=(), shards=shards)
    fractions = prune_fractions(weights[:, None] * evictable[None, :] ** 2, tokens, sink, window, graph)
    return Profile(mean_fractions(fractions, 1), scorer="snapkv", sink=sink, window=window,
                   calibration=json.dumps({"shards": shards}))


def test_solved_profiles_split_the_kept_tokens_as_expected():
    def rank_shares(profile):
        keep = (1 - profile.fractions(0.8)).sum(axis=0)
        return keep[:2].sum() / keep.sum(), keep[2:].sum() / keep.sum()

    assert rank_shares(solved_profile(1))[1] > 0.6  # the single-process solution loads rank 1
    assert abs(np.subtract(*rank_shares(solved_profile(2)))) < 0.05


def two_ranks(tmp_path, model, profile: str, balanced: str) -> tuple[str, list[dict]]:
    """(stderr, each rank's results) of tp_worker.py on 2 ranks for `model` and the two profiles' paths."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    model.save_pretrained(tmp_path / "model")
    run = subprocess.run([torchrun, "--nproc-per-node", "2", str(WORKER), str(tmp_path / "model"), profile, balanced,
                          str(tmp_path), "inductor"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stderr, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def assert_ranks_equal_one_process(model, ranks: list[dict], profile, balanced) -> dict:
    """Each rank's tokens == the single-process lukv model's (== plain transformers at compression 0), and its kept
    positions == the single-process cache's for its heads; returns the single-process results."""
    with torch.no_grad():
        plain = conversation(model, None, 1)
    alone = run_cases(model, torch.compile(model, backend="lukv", options={"inner": "aot_eager"}), profile, balanced)
    assert alone["0.0"]["tokens"] == plain.tolist()
    heads = model.config.num_key_value_heads // 2
    for name, want in alone.items():
        for rank in ranks:
            got = rank[name]
            start, stop = got["heads"]
            assert (start, stop) == (heads * rank["rank"], heads * rank["rank"] + heads)
            assert got["tokens"] == want["tokens"], name
            assert got["kept"] == [[row[start:stop] for row in layer] for layer in want["kept"]], name
    return alone


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=4, head_dim=16, seed=3)
    four_head_profile().save(tmp_path / "profile.safetensors")
    solved_profile(2).save(tmp_path / "balanced.safetensors")
    stderr, ranks = two_ranks(tmp_path, model, str(tmp_path / "profile.safetensors"),
                              str(tmp_path / "balanced.safetensors"))
    assert "more KV on the fullest rank" in stderr and "--shards 2" in stderr  # said, with the fix
    assert_ranks_equal_one_process(model, ranks, four_head_profile(), solved_profile(2))
    held = [rank["0.8"]["nbytes"] for rank in ranks]
    assert held[1] > 1.5 * held[0]  # the unbalanced profile: rank 1 holds the heads that keep more
    balanced = [rank["0.8 balanced"]["nbytes"] for rank in ranks]
    assert max(balanced) <= 1.05 * min(balanced), balanced


@pytest.mark.slow
def test_a_sliding_window_hybrid_on_two_ranks_equals_one_process(tmp_path):
    """Gemma 3 (sliding-window layers left exact around a compressed global layer), 4 KV heads, uniform budgets."""
    model = tiny_gemma3(seed=3, kv_heads=4)
    _, ranks = two_ranks(tmp_path, model, "uniform", "uniform")
    assert_ranks_equal_one_process(model, ranks, "uniform", "uniform")
    assert all(len(rank["0.8"]["kept"]) == 1 for rank in ranks)  # the one global layer, evicted


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


BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_tensor_parallel.py"


@pytest.mark.slow
def test_smollm2_on_three_ranks_equals_one_process_and_takes_the_balanced_profile(tmp_path):
    """SmolLM2 (3 KV heads) on 3 ranks, one head each, lukv's defaults: the benchmark's cases on one short passkey
    document, then the same in one process."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", PROFILE_DIR_ENV: str(tmp_path / "no-user-profiles")}
    args = ["--context", "512", "--samples", "1", "--new-tokens", "8", "--json"]
    for command, out in (([torchrun, "--nproc-per-node", "3", str(BENCH)], "tp3.json"),
                         ([sys.executable, str(BENCH)], "one.json")):
        run = subprocess.run([*command, *args, str(tmp_path / out)], capture_output=True, text=True, timeout=900,
                             env=env)
        assert run.returncode == 0, run.stderr[-4000:]
    sharded, single = (json.loads((tmp_path / name).read_text())["ranks"] for name in ("tp3.json", "one.json"))
    assert len(sharded) == 3
    for rank in sharded:
        assert rank["full"][0]["tokens"] == single[0]["full"][0]["tokens"]  # compression 0 == one process
        assert rank["default"][0]["profile_shards"] == 3  # found: the profile solved for 3 shards
    assert single[0]["default"][0]["profile_shards"] == 1
    for case in ("balanced", "default"):
        kept = [rank[case][0]["kept"] for rank in sharded]
        assert max(kept) <= 1.05 * min(kept), (case, kept)
