"""Masked simulation == real eviction.

A dense attention over the full-length cache that masks exactly the tokens each KV head evicted gives
the same logits as LU-KV's ragged cache with the same budgets: the proof that the ragged path is right
(and that eviction is physical, not a mask: the ragged cache holds only the kept tokens).
"""

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model
from torch._dynamo.utils import counters
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lukv_compile import LUKVCache, full_cache_nbytes
from lukv_compile.profile import Profile

KEPT: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, total_len] bool: token still in that head's cache


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense eager attention; after the prompt it also masks the tokens the LU-KV cache evicted, per KV head."""
    b, hq, q_len, d = query.shape
    group = hq // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    logits = query @ key.transpose(-1, -2) * (scaling or d**-0.5)
    visible = torch.ones(b, 1, q_len, key.shape[2], dtype=torch.bool).tril(key.shape[2] - q_len)
    if attention_mask is not None:
        visible = visible & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    if key.shape[2] > q_len and module.layer_idx in KEPT:  # every forward after the prompt's
        kept = KEPT[module.layer_idx][:, :, : key.shape[2]].repeat_interleave(group, dim=1)
        visible = visible & kept[:, :, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # padding rows see nothing
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("lukv_masked_simulation", masked_attention)
AttentionMaskInterface.register("lukv_masked_simulation", sdpa_mask)  # boolean 4-D padding + causal masks


def kept_mask(cache: LUKVCache, batch: int, total: int) -> dict[int, torch.Tensor]:
    masks = {}
    for i, layer in enumerate(cache.layers):
        mask = torch.zeros(batch, cache.num_kv_heads, total, dtype=torch.bool)
        for b, row in enumerate(layer.kept_positions()):
            for h, positions in enumerate(row):
                mask[b, h, positions.long()] = True
        masks[i] = mask
    return masks


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

    KEPT.clear()
    KEPT.update(kept_mask(cache, 2, total))
    reference = tiny_model("llama", layers=layers, q_heads=4, kv_heads=2, head_dim=16, seed=3)
    reference.set_attn_implementation("lukv_masked_simulation")
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
