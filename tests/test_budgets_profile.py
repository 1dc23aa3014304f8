"""Profile file format, budget rounding and the scorers' contracts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lukv_compile.policy.budgets import adaptive_keep, global_keep_counts, keep_counts, layer_keep_counts
from lukv_compile.policy.scorers import SCORERS, Rope, score
from lukv_compile.policy.selection import protect_and_mask, select_tokens
from lukv_compile.profile import Profile, ProfileError, ratio_row

fractions = st.integers(1, 6).flatmap(lambda layers: st.integers(1, 4).flatmap(
    lambda heads: st.lists(st.floats(0, 0.99), min_size=layers * heads, max_size=layers * heads).map(
        lambda xs: np.array(xs).reshape(layers, heads))))


@settings(max_examples=60, deadline=None)
@given(prune=fractions, length=st.integers(1, 5000))
def test_layer_rounding_is_lukv_rounding_where_no_floor_binds(prune, length):
    keep = layer_keep_counts(prune, length)
    ideal = (1 - prune) * length
    free = ideal.min(1) >= 1  # layers whose every head is above the floor of one token
    assert np.array_equal(keep.sum(1)[free], np.rint(ideal.sum(1))[free])
    assert np.all(np.abs(keep - ideal)[free] < 1 + 1e-9)  # floor plus at most one


profiles = st.integers(1, 6).flatmap(lambda layers: st.integers(1, 8).flatmap(
    lambda heads: st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 0.95])).map(
        lambda a: random_profile(layers, heads, *a))))


def random_profile(layers: int, heads: int, seed: int, spiky: float) -> Profile:
    """Random prune fractions, some heads near 1 (spiky) so the floors bind often."""
    rng = np.random.default_rng(seed)
    prune = rng.random((99, layers, heads)) * 0.999
    prune[rng.random(prune.shape) < spiky / 2] = 0.999
    return Profile(prune.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(profile=profiles, length=st.integers(1, 5000), protected=st.integers(0, 64))
def test_keep_counts_sum_to_the_layer_target_at_every_ratio(profile, length, protected):
    heads = profile.num_kv_heads
    floor = min(length, max(protected, 1))
    for compression in np.arange(1, 100) / 100:
        keep = keep_counts(profile, compression, [length], protected)[0]
        ideal = (1 - profile.fractions(compression).astype(np.float64)) * length
        target = np.clip(np.rint(ideal.sum(1)), heads * floor, heads * length)
        assert np.array_equal(keep.sum(1), target), compression
        assert keep.min() >= min(length, protected) and keep.min() >= floor and keep.max() <= length


def test_floors_are_paid_by_the_other_heads_in_proportion():
    prune = np.array([[0.999, 0.5, 0.0]])  # ideal keeps 1, 500, 1000 of 1000; floor 36 costs 35 tokens
    keep = layer_keep_counts(prune, 1000, floor=36)
    assert keep.sum() == 1501 and keep[0, 0] == 36
    # The 35 tokens come from the other two heads in proportion to what they keep above the floor.
    assert keep[0].tolist() == [36, 500 - 11, 1000 - 24]  # 35 * 464 / 1428 = 11.4, 35 * 964 / 1428 = 23.6


@settings(max_examples=30, deadline=None)
@given(profile=profiles, length=st.integers(1, 300), protected=st.integers(0, 64),
       compression=st.sampled_from(np.arange(1, 100) / 100), seed=st.integers(0, 1000))
def test_adaptive_split_keeps_the_layer_total(profile, length, protected, compression, seed):
    totals = torch.from_numpy(keep_counts(profile, compression, [length], protected)[0].sum(1))  # [L]
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(profile.num_layers, profile.num_kv_heads, length, generator=generator)
    keep = adaptive_keep(scores, totals)  # one row per layer
    assert torch.equal(keep.sum(-1), totals) and keep.max() <= length


def test_shipped_profiles_load_and_gemma_budgets_only_its_global_layers():
    folder = Path(__file__).resolve().parents[1] / "lukv_compile" / "profiles"
    for path in folder.glob("smollm2-*.safetensors"):  # written before excluded_layers existed
        assert Profile.load(path).excluded_layers == ()
    for scorer in ("snapkv", "keydiff"):
        profile = Profile.load(folder / f"gemma-3-270m-{scorer}.safetensors")
        assert profile.excluded_layers == tuple(sorted(set(range(18)) - {5, 11, 17}))
        keep = 1 - profile.fractions(0.8)
        assert (keep[list(profile.excluded_layers)] == 1).all()
        assert abs(keep[[5, 11, 17]].mean() - 0.2) < 1e-3


def test_shipped_reconstruction_profile_is_what_the_default_recipe_records():
    """docs/results.md's Reproduce re-makes it with the CLI defaults: budgets solved for the unpooled ranking."""
    from lukv_compile.profiling.reconstruction import PROFILE_POOL
    from lukv_compile.profiling.run import reconstruction_description
    from lukv_compile.tools.cli import build_parser

    folder = Path(__file__).resolve().parents[1] / "lukv_compile" / "profiles"
    calibration = json.loads(Profile.load(folder / "smollm2-135m-instruct-reconstruction.safetensors").calibration)
    args = build_parser().parse_args(["profile", "smollm2", "--scorer", "reconstruction", "--out", "x.safetensors"])
    assert args.reconstruction_pool == PROFILE_POOL == 1
    assert calibration["reconstruction"] == reconstruction_description(PROFILE_POOL)


def test_compression_zero_keeps_everything_and_row_lookup():
    profile = Profile.uniform(2, 2)
    assert (keep_counts(profile, 0.0, [100], 36) == 100).all()
    assert ratio_row(0.8) == 79 and ratio_row(0.001) == 0 and ratio_row(0.999) == 98
    assert np.allclose(profile.fractions(0.8), 0.8)


def test_profile_roundtrip_and_kvpress_npy(tmp_path):
    profile = Profile.pyramid(4, 2, scorer="keydiff")
    profile.model, profile.fingerprint = {"name": "tiny"}, "abc123"
    path = tmp_path / "p.safetensors"
    profile.save(path)
    loaded = Profile.load(path)
    assert np.array_equal(loaded.prune, profile.prune)
    assert (loaded.scorer, loaded.sink, loaded.window, loaded.fingerprint) == ("keydiff", 4, 1, "abc123")
    profile.to_kvpress_npy(tmp_path / "p.npy")
    imported = Profile.from_kvpress_npy(tmp_path / "p.npy", scorer="keydiff")
    assert np.array_equal(imported.prune, profile.prune)


def test_pyramid_keeps_the_uniform_total_and_falls_with_depth():
    keep = 1 - Profile.pyramid(8, 2).fractions(0.8)
    assert np.isclose(keep.mean(), 0.2, atol=1e-3)
    assert (np.diff(keep[:, 0]) < 0).all()


def test_bad_profile_files_are_named(tmp_path):
    path = tmp_path / "broken.safetensors"
    Profile.uniform(2, 2).save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ProfileError, match="broken.safetensors"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="no such profile"):
        Profile.load(tmp_path / "missing.safetensors")
    np.save(tmp_path / "bad.npy", np.zeros((10, 2, 2)))
    with pytest.raises(ProfileError, match=r"bad.npy: prune fractions must have shape \[99"):
        Profile.from_kvpress_npy(tmp_path / "bad.npy", scorer="snapkv")
    with pytest.raises(ProfileError, match="fingerprint"):
        Profile(Profile.uniform(2, 2).prune, fingerprint="aaa").check_model(2, 2, fingerprint="bbb")


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), t=st.integers(2, 60), seed=st.integers(0, 1000))
def test_adaptive_keep_sums_to_layer_total(b, h, t, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, t, generator=g)
    totals = torch.randint(h, h * t + 1, (b,), generator=g)
    keep = adaptive_keep(scores, totals)
    assert torch.equal(keep.sum(-1), totals)
    assert (keep >= (0.2 * totals / h).floor()[:, None]).all()


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 80), pad=st.integers(0, 20), sink=st.integers(0, 6), window=st.integers(0, 10),
       seed=st.integers(0, 1000))
def test_selection_keeps_protected_never_padding(t, pad, sink, window, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.cat([torch.zeros(pad, dtype=torch.bool), torch.ones(t, dtype=torch.bool)]).expand(1, 2, -1)
    scores = protect_and_mask(torch.randn(1, 2, pad + t, generator=g), valid, sink, window)
    keep = torch.full((1, 2), min(t, sink + window) + (t - min(t, sink + window)) // 2)
    chosen = select_tokens(scores, keep)
    assert torch.equal(chosen.sum(-1), keep)
    assert not chosen[..., :pad].any()
    protected = list(range(pad, pad + min(sink, t))) + list(range(pad + max(t - window, 0), pad + t))
    assert chosen[..., protected].all()


@pytest.mark.parametrize("name", SCORERS)
def test_scorers_shape_and_gqa_granularity(name):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    valid = torch.ones(2, 2, 50, dtype=torch.bool)
    s = score(name, q, k, v, valid, rope=Rope.from_theta(16, 10000.0))
    assert s.shape == (2, 2, 50) and s.dtype == torch.float32 and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="unknown scorer"):
        score("h2o", q, k, v, valid)


def test_snapkv_prefers_keys_the_window_attends():
    q = torch.zeros(1, 1, 40, 8)
    k = torch.zeros(1, 1, 40, 8)
    q[..., -32:, 0] = 5.0
    k[..., 3, 0] = 5.0  # only token 3 matches the observation window's queries
    s = score("snapkv", q, k, torch.ones(1, 1, 40, 8), torch.ones(1, 1, 40, dtype=torch.bool))
    assert s[0, 0].argmax() in (0, 1, 2, 3, 4, 5, 6)  # max-pooling spreads it over its neighbours
    assert s[0, 0, 3] > s[0, 0, 20]


def test_floored_profile_keeps_totals_and_lifts_starved_heads():
    profile = Profile.uniform(3, 2)
    profile.prune[:, 0, 0] = 0.999  # a head the profile starves
    profile.prune[:, 0, 1] = np.clip(1 - 2 * (1 - profile.prune[:, 0, 1]) + 0.001, 0, 0.999)
    floored = profile.floored(0.2)
    for compression in (0.5, 0.8, 0.9):
        keep, kept = 1 - profile.fractions(compression), 1 - floored.fractions(compression)
        np.testing.assert_allclose(kept.mean(axis=1), keep.mean(axis=1), atol=1e-6)  # same total per layer
        assert kept.min() >= 0.2 * (1 - compression) - 1e-6
    assert "floored 0.2" in floored.scope and profile.floored(0.0).prune.tolist() == profile.prune.tolist()
    with pytest.raises(ValueError, match="floor share must be in"):
        profile.floored(1.5)


def test_global_top_r_keeps_the_same_total_and_follows_the_scores_across_heads():
    scores = torch.rand(2, 3, 40)
    scores[1, 2, 10:30] += 10  # one head's middle tokens outrank every other head's
    counts = torch.full((2, 3), 12)
    got = global_keep_counts(scores, counts, sink=4, window=2)
    assert got.sum() == counts.sum() and (got >= 6).all()  # same total; every head keeps its protected tokens
    assert got[1, 2] >= 6 + 20 and got[1, 2] == got.max()  # that head takes all it outranks the others with


def test_a_floored_global_selection_keeps_every_head_its_floor_and_the_same_total():
    """AdaKV's safeguard over the whole model: the heads whose scores lose still keep their floor."""
    scores = torch.rand(2, 3, 40)
    scores[1, 2] += 10  # heads that outrank every other, in this order
    scores[0, 0] += 5
    scores[0, 1] += 2
    counts = torch.full((2, 3), 20)
    bare = global_keep_counts(scores, counts, sink=4, window=2)
    floored = global_keep_counts(scores, counts, sink=4, window=2, floor_share=0.5)  # floor: half the mean, 10
    assert bare.tolist() == [[40, 22, 6], [6, 6, 40]]  # the losing heads keep their protected tokens only
    assert floored.tolist() == [[40, 10, 10], [10, 10, 40]]
