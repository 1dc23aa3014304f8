"""Warm start (compiler/warm_start.py): where the compile artifacts live, and when there is nothing to do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

from lukv_compile import save_warm_start, warm_start
from lukv_compile.compiler import warm_start as warm


def test_artifacts_live_in_the_user_cache_keyed_by_torch_and_model(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = warm.artifacts_path(tiny_model("llama", layers=2))
    assert path.parent == tmp_path / "lukv" and torch.__version__ in path.name
    assert path != warm.artifacts_path(tiny_model("llama", layers=3))


def test_nothing_to_do_when_caches_are_off_or_nothing_was_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = tiny_model("llama", layers=2)
    assert warm.caching_disabled()  # conftest: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, as in CI
    assert warm_start(model) is None and save_warm_start(model) is None
    with torch.compiler.config.patch(force_disable_caches=False):
        assert warm_start(model) is None  # no earlier run saved anything
        ids, mask = left_padded_batch([30])
        torch.compile(model, backend="lukv", options={"inner": "aot_eager"}).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        assert save_warm_start(model) is None  # aot_eager caches nothing
    assert not (tmp_path / "lukv").exists()


WARM_SCRIPT = """
import sys

import torch
from torch._dynamo.utils import counters

import lukv_compile
from tiny_models import left_padded_batch, tiny_model

action, out = sys.argv[1], sys.argv[2]
model = tiny_model("llama", layers=2, seed=4)
loaded = lukv_compile.warm_start(model) if action == "load" else None  # before the first compiled call
compiled = torch.compile(model, backend="lukv", options={"inner": "inductor", "compression": 0.8})
ids, _ = left_padded_batch([40], seed=6)
cache = lukv_compile.LUKVCache(model.config, compression=0.8)
with torch.no_grad():
    logits = compiled(input_ids=ids, cache=cache).logits
assert cache.layers[0].kept_positions()[0][0].numel() < 40  # the forward evicted
saved = lukv_compile.save_warm_start(model) if action == "save" else None
torch.save({"logits": logits, "loaded": loaded and str(loaded), "saved": saved and str(saved),
            **{key: counters["inductor"][f"fxgraph_cache_{key}"] for key in ("hit", "miss", "bypass")}}, out)
"""


@pytest.mark.slow
def test_warm_start_round_trip_between_processes(tmp_path):
    """Process 1 compiles on inductor and saves its artifacts; process 2 (a fresh interpreter with an empty
    inductor cache of its own) loads them before its first compiled call, compiles from them without
    generating any code, and computes the same logits bit for bit."""
    script = tmp_path / "warm_round_trip.py"
    script.write_text(WARM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_FORCE_DISABLE_CACHES"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")])))

    def run(action: str, inductor_cache: str) -> dict:
        out = tmp_path / f"{action}.pt"
        result = subprocess.run([sys.executable, str(script), action, str(out)], capture_output=True, text=True,
                                env={**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_cache)}, timeout=600)
        assert result.returncode == 0, f"{action} exited {result.returncode}\n{result.stderr[-4000:]}"
        return torch.load(out)

    def facts(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "logits"}

    first = run("save", "inductor-1")
    assert first["loaded"] is None
    assert first["bypass"] == 0, f"inductor bypassed its graph cache (nothing to save): {facts(first)}"
    assert first["miss"] > 0 and first["saved"], f"an inductor compile left nothing to save: {facts(first)}"
    saved = Path(first["saved"])
    assert saved.is_file() and saved.stat().st_size > 0 and saved.parent == tmp_path / "xdg" / "lukv"

    second = run("load", "inductor-2")  # an empty inductor cache: only the warm-start file can warm it
    assert second["loaded"] == str(saved)
    assert second["miss"] == 0 and second["hit"] == first["miss"], facts(second)  # every graph came from the file
    assert torch.equal(second["logits"], first["logits"])
