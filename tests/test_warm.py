"""Warm start (compiler/warm_start.py): where the compile artifacts live, and when there is nothing to do."""

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
