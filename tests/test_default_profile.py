"""Without `profile=`, a cache gets the model's own LU-KV profile, found by config fingerprint in the user's profile
folder first, then the shipped ones (lukv_compile/profiles); a model without one gets uniform budgets and one
warning naming the command that makes a profile. The real model's one-line case is in test_real_model.py."""

import json
import warnings

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from lukv_compile import LUKVCache, LUKVWarning, Profile
from lukv_compile.config import config_fingerprint
from lukv_compile.profiles import DEFAULT_RANKINGS, PROFILE_DIR_ENV, SHIPPED_DIR, find_profile
from lukv_compile.runtime import default_profile
from lukv_compile.runtime.sharding import HeadShard


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv(PROFILE_DIR_ENV, str(folder))
    monkeypatch.setattr(default_profile, "_warned", set())  # each test sees its own first warning
    return folder


def smollm2_config():
    from transformers import AutoConfig

    from lukv_compile.models import prepared_dir

    return AutoConfig.from_pretrained(prepared_dir("smollm2"))


def profile_for(config, scorer: str = "snapkv", shards: int = 1, seed: int = 0) -> Profile:
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    prune = np.sort(np.random.default_rng(seed).uniform(0, 0.95, (99, layers, heads)), axis=0).astype(np.float32)
    return Profile(prune, scorer=scorer, fingerprint=config_fingerprint(config),
                   calibration=json.dumps({"shards": shards}))


def test_a_shipped_model_gets_its_profile_without_asking():
    config = smollm2_config()
    cache = LUKVCache(config, compression=0.8)
    shipped = Profile.load(SHIPPED_DIR / f"smollm2-135m-instruct-{DEFAULT_RANKINGS[0]}.safetensors")
    assert cache.profile.scorer == DEFAULT_RANKINGS[0] and np.array_equal(cache.profile.prune, shipped.prune)
    # a scorer asked for picks that ranking's profile; an explicit profile or "uniform" overrides the lookup
    assert LUKVCache(config, compression=0.8, scorer="snapkv").profile.fingerprint == shipped.fingerprint
    assert LUKVCache(config, compression=0.8, scorer="snapkv").profile.scorer == "snapkv"
    assert LUKVCache(config, compression=0.8, profile="uniform").profile.scope == "uniform"
    explicit = SHIPPED_DIR / "smollm2-135m-instruct-expected_attention.safetensors"
    assert LUKVCache(config, compression=0.8, profile=explicit).profile.scorer == "expected_attention"


def test_a_model_without_a_profile_gets_uniform_budgets_and_one_warning(user_dir):
    model = tiny_model("llama", layers=2, kv_heads=2)
    with pytest.warns(LUKVWarning) as said:
        cache = LUKVCache(model.config, compression=0.8)
        LUKVCache(model.config, compression=0.5)
    assert len(said) == 1
    message = str(said[0].message)
    assert "no LU-KV profile" in message and "lukv profile MODEL_FOLDER --quick" in message
    assert str(user_dir) in message and "uniform" in message
    assert cache.profile.scope == "uniform"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LUKVCache(model.config, compression=0.8, profile="uniform")  # asked for: no warning


def test_the_one_line_route_warns_for_a_model_without_a_profile():
    model = tiny_model("llama", layers=2, kv_heads=2)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    with pytest.warns(LUKVWarning, match="lukv profile MODEL_FOLDER --quick"):
        compiled.generate(torch.randint(1, 100, (1, 40)), max_new_tokens=2, do_sample=False)


def test_a_profile_in_the_user_folder_is_found_and_wins_over_the_shipped_one(user_dir):
    model = tiny_model("llama", layers=2, kv_heads=2)
    mine = profile_for(model.config, "keydiff")
    mine.save(user_dir / "tiny-keydiff.safetensors")
    profile_for(tiny_model("llama", layers=3, kv_heads=2).config).save(user_dir / "other-model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = LUKVCache(model.config, compression=0.8)
    assert np.array_equal(cache.profile.prune, mine.prune)

    config = smollm2_config()
    profile_for(config, "snapkv", seed=1).save(user_dir / "my-smollm2.safetensors")
    assert find_profile(config).path == user_dir / "my-smollm2.safetensors"


def test_rankings_are_preferred_in_the_measured_order_and_reconstruction_never(user_dir):
    config = tiny_model("llama", layers=2, kv_heads=2).config
    for scorer in ("reconstruction", "snapkv", "keydiff", "window_expected_attention"):
        profile_for(config, scorer).save(user_dir / f"tiny-{scorer}.safetensors")
    assert find_profile(config).profile.scorer == "window_expected_attention"
    (user_dir / "tiny-window_expected_attention.safetensors").unlink()
    assert find_profile(config).profile.scorer == "keydiff"
    assert find_profile(config, scorer="snapkv").profile.scorer == "snapkv"
    assert find_profile(config, scorer="reconstruction") is None


def test_a_tensor_parallel_rank_takes_the_profile_solved_for_its_shard_count(user_dir):
    config = tiny_model("llama", layers=2, q_heads=4, kv_heads=4).config
    one, two = profile_for(config, "keydiff"), profile_for(config, "keydiff", shards=2, seed=1)
    one.save(user_dir / "tiny-keydiff.safetensors")
    two.save(user_dir / "tiny-keydiff-tp2.safetensors")
    cache = LUKVCache(config, compression=0.8)
    assert np.array_equal(cache.profile.prune, one.prune)  # one process: the single-process solution
    cache.take_shard(HeadShard(2, 4, 4, 1, 2))
    assert np.array_equal(cache.profile.prune, two.prune)
    assert all(layer.profile is cache.profile for layer in cache.layers)


def test_an_unreadable_file_in_the_user_folder_is_skipped_and_said(user_dir, caplog):
    (user_dir / "broken.safetensors").write_bytes(b"not a profile")
    config = tiny_model("llama", layers=2, kv_heads=2).config
    profile_for(config, "keydiff").save(user_dir / "tiny.safetensors")
    assert find_profile(config).path.name == "tiny.safetensors"
    assert any("broken.safetensors" in r.getMessage() for r in caplog.records)
