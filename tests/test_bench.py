"""`lukv bench` on tiny random models: every field there, positive where it must be, ratios the quotients.

No timing assertions: the figures are whatever this machine measured; only their consistency is checked.
"""

import json
import math

import pytest
import torch
from tiny_models import tiny_model

from lukv_compile.profile import Profile
from lukv_compile.tools import bench
from lukv_compile.tools.cli import build_parser

PER_DECODER = [f"{prefix}_{name}" for prefix in ("decode_ms", "tokens_per_s") for name in bench.DECODERS]
POSITIVE = [
    "context", "num_threads", "prompt_tokens", "compression", "steps", "prefill_repeats", "e2e_tokens",
    "decode_steps_timed", "kv_bytes_lukv", "kv_bytes_full", "kv_bytes_ratio", *PER_DECODER,
    "tokens_per_s_ratio_lukv_plain", "tokens_per_s_ratio_lukv_static",
    "prefill_s_lukv", "prefill_s_plain", "prefill_s_static", "prefill_eviction_s", "prefill_eviction_share_of_plain",
    "e2e_s_lukv", "e2e_s_plain", "e2e_s_static", "e2e_speedup_lukv_plain", "e2e_speedup_lukv_static",
    "attention_ms_lukv", "attention_ms_full_sdpa", "attention_speedup",
]


def random_ids(context: int) -> torch.Tensor:
    return torch.randint(1, 128, (1, context), generator=torch.Generator().manual_seed(context))


@pytest.fixture
def restore_threads():
    """The bench raises Dynamo's recompile limit and sets the thread count: undo both for later tests."""
    threads = torch.get_num_threads()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("regional", [False, True])
def test_bench_rows_on_tiny_models(restore_threads, tmp_path, capsys, regional):
    models = {name: tiny_model("llama", layers=2) for name in bench.DECODERS}
    opts = bench.BenchOptions(compression=0.8, inner="aot_eager", steps=3, prefill_repeats=2, e2e_tokens=4,
                              regional=regional)
    rows = bench.bench_threads(models, Profile.uniform(2, 2), random_ids, [64, 128], opts, "1", 1)
    out = tmp_path / "bench.json"
    result = bench.report(rows, {"model": "tiny"}, str(out))

    assert json.loads(out.read_text()) == result
    # static's generate went through transformers' own compiled decode (its compile_config), as on a GPU
    assert models["static"]._last_compile_config.backend == "aot_eager"
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == result["rows"] and [r["context"] for r in printed] == [64, 128]
    for row in printed:
        assert (row["threads"], row["inner"], row["decode_steps_timed"], row["regional"]) == (
            "1", "aot_eager", 1, regional)
        for field in POSITIVE:
            assert row[field] > 0, field
        assert set(row["compile_s"]) == set(bench.DECODERS)
        assert all(math.isfinite(v) for times in row["compile_s"].values() for v in times.values())
        for name in bench.DECODERS:
            assert row[f"tokens_per_s_{name}"] == pytest.approx(1000 / row[f"decode_ms_{name}"])
        for base in ("plain", "static"):
            assert row[f"tokens_per_s_ratio_lukv_{base}"] == pytest.approx(
                row["tokens_per_s_lukv"] / row[f"tokens_per_s_{base}"])
        assert row["kv_bytes_ratio"] == pytest.approx(row["kv_bytes_lukv"] / row["kv_bytes_full"])
        assert row["kv_bytes_lukv"] < row["kv_bytes_full"]  # compression 0.8 keeps about a fifth (+ sink, window)
        for base in ("plain", "static"):
            assert row[f"e2e_speedup_lukv_{base}"] == pytest.approx(row[f"e2e_s_{base}"] / row["e2e_s_lukv"])
        assert row["attention_speedup"] == pytest.approx(row["attention_ms_full_sdpa"] / row["attention_ms_lukv"])
        assert row["prefill_eviction_share_of_plain"] == pytest.approx(
            row["prefill_eviction_s"] / row["prefill_s_plain"])


def test_bench_arguments_and_thread_settings():
    args = build_parser().parse_args(["bench"])
    assert (args.contexts, args.threads, args.inner, args.compression) == ([1024, 4096, 8192], "1,default",
                                                                          "inductor", 0.8)
    assert bench.BenchOptions.from_args(args) == bench.BenchOptions()
    assert (args.steps, args.prefill_repeats, args.e2e_tokens) == (20, 1, 64)
    default = torch.get_num_threads()
    assert bench.thread_settings("1,default") == [("1", 1)] + ([("default", default)] if default != 1 else [])
    assert bench.thread_settings("2,2") == [("2", 2)]
    with pytest.raises(ValueError, match="--threads"):
        bench.thread_settings("1,many")
    with pytest.raises(ValueError, match="--steps"):
        bench.BenchOptions(steps=bench.WARMUP_STEPS)
    gpu = build_parser().parse_args(["bench", "--device", "cpu", "--dtype", "bfloat16", "--mode", "reduce-overhead",
                                     "--weights", "random"])
    assert bench.BenchOptions.from_args(gpu) == bench.BenchOptions(dtype="bfloat16", mode="reduce-overhead",
                                                                   weights="random")
    with pytest.raises(ValueError, match="mode='reduce-overhead'.*needs inner='inductor'"):
        bench.BenchOptions(inner="aot_eager", mode="reduce-overhead")
    with pytest.raises(ValueError, match="--weights must be one of real, random, got 'fake'"):
        bench.BenchOptions(weights="fake")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            bench.BenchOptions(device="cuda")


def test_random_weights_model_has_the_real_architecture():
    """`--weights random` (the GPU check) builds SmolLM2's shape: the shipped profiles apply to it."""
    from lukv_compile.config import config_fingerprint
    from lukv_compile.eval.methods import shipped_profile
    from lukv_compile.models import random_model

    model = random_model("smollm2", torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert shipped_profile(model, "snapkv").fingerprint == config_fingerprint(model.config)
    ids = bench.random_ids(model.config.vocab_size)(16)
    assert ids.shape == (1, 16) and torch.equal(ids, bench.random_ids(model.config.vocab_size)(16))
    with pytest.raises(ValueError, match="smollm2 only"):
        random_model("gemma3")
