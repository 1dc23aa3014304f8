"""Masked simulation == real eviction (lukv_compile.testing.simulation, the users' CI property too).

A dense attention over the full-length cache that masks exactly the tokens each KV head evicted gives
the same logits as LU-KV's ragged cache with the same budgets: the proof that the ragged path is right
(and that eviction is physical, not a mask: the ragged cache holds only the kept tokens).
"""

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model
from torch._dynamo.utils import counters
from transformers import DynamicCache

from lukv_compile import LUKVCache, full_cache_nbytes
from lukv_compile.profile import Profile
from lukv_compile.testing import masked_reference


def skewed_profile(scorer: str, layers: int = 2) -> Profile:
    """A non-uniform profile, so heads really keep different amounts."""
    profile = Profile.uniform(layers, 2, scorer=scorer)
    profile.prune[:, 0, 0] *= 0.5
    profile.prune[:, 1, 1] = 1 - (1 - profile.prune[:, 1, 1]) * 0.5
    for layer in range(2, layers):  # deeper layers: one head keeps about twice its share, alternating heads
        profile.prune[:, layer, layer % 2] *= 0.5
    return profile


def two_turns(model, ids, mask, cache=None):
    """The prompt plus 6 new tokens, then a second user turn of 9 tokens plus 5 new tokens (one generate each)."""
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    first = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=6, **kwargs)
    turn = torch.randint(1, 128, (ids.shape[0], 9), generator=torch.Generator().manual_seed(7))
    history = torch.cat([first.sequences, turn], dim=1)
    mask2 = torch.cat([mask, torch.ones(mask.shape[0], history.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    second = model.generate(input_ids=history, attention_mask=mask2, cache=cache, max_new_tokens=5, **kwargs)
    return torch.cat([torch.stack(first.logits), torch.stack(second.logits)]), second.sequences


@pytest.mark.parametrize("policy, scorer, compression", [
    ("lukv", "snapkv", 0.6), ("adakv", "snapkv", 0.7), ("lukv", "keydiff", 0.8),
    ("lukv", "expected_attention", 0.5), ("lukv", "streaming", 0.6),
])
def test_masked_simulation_equals_ragged_cache_across_turns(policy, scorer, compression):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, seed=3)
    compiled = torch.compile(model, backend="lukv", options={"inner": "eager"})
    assert_ragged_equals_masked(compiled, 2, policy, scorer, compression)


def assert_ragged_equals_masked(compiled, layers, policy, scorer, compression):
    """`two_turns` through `compiled` (a tiny llama of `layers` layers, seed 3) on a LUKVCache with a skewed
    profile equals it on the same model run densely with each head's evicted tokens masked out."""
    ids, mask = left_padded_batch([120, 97], seed=5)
    config = compiled.config
    cache = LUKVCache(config, profile=skewed_profile(scorer, layers), compression=compression, policy=policy)
    ragged_logits, ragged_tokens = two_turns(compiled, ids, mask, cache)
    lengths = [len(p) for row in cache.layers[0].kept_positions() for p in row]
    assert len(set(lengths)) > 1, "heads should hold different numbers of tokens"
    total = ragged_tokens.shape[1]
    assert cache.nbytes() < full_cache_nbytes(config, 2, total, torch.float32)

    reference = masked_reference(tiny_model("llama", layers=layers, q_heads=4, kv_heads=2, head_dim=16, seed=3),
                                 cache, total)
    dense_logits, dense_tokens = two_turns(reference, ids, mask)
    torch.testing.assert_close(ragged_logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(ragged_tokens, dense_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("regional", [False, True], ids=["whole_model", "regional"])
def test_masked_simulation_equals_ragged_cache_on_inductor(regional):
    """The same differential at compression 0.8 on a 4-layer model through the default inner compiler (inductor):
    the whole model, or one decoder layer shared by all four. One compiled model serves every policy and
    scorer (the policy lives in the cache): the later cases compile nothing new."""
    compiled = torch.compile(tiny_model("llama", layers=4, q_heads=4, kv_heads=2, head_dim=16, seed=3),
                             backend="lukv", options={"regional": regional})
    for i, (policy, scorer) in enumerate([("lukv", "snapkv"), ("adakv", "keydiff"),
                                          ("lukv", "window_expected_attention")]):
        assert_ragged_equals_masked(compiled, 4, policy, scorer, 0.8)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
    assert counters["stats"]["unique_graphs"] == graphs
