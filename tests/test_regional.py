"""Regional compilation (`options={"regional": True}`): the model's decoder layers share one compiled layer
graph and the glue runs eagerly. Exact at full budget (aot_eager and the default inductor), the same
tokens as the whole-model compile when compressing, a handful of graphs, and clear errors for what it
cannot compile."""

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import (
    PlainAttentionModel,
    assert_same_conversation,
    assert_same_generation,
    generate_logits,
    left_padded_batch,
    tiny_gemma3,
    tiny_model,
)
from torch._dynamo.utils import counters

from lukv_compile import LUKVCache
from lukv_compile.compiler.regional import RegionalCompileError
from lukv_compile.runtime.cache import full_cache_nbytes

# Layer graphs of one batch size: chunks with a padding mask and without one (the eager glue drops an all-ones
# mask), decode steps. (The layer index is dynamic from the first call: no graph for layer 0 alone.)
REGIONAL_GRAPHS = 3


def twins(layers: int = 4, family: str = "llama"):
    """Two instances with the same weights: compiling one leaves the other a plain reference."""
    return tiny_model(family, layers=layers, seed=1), tiny_model(family, layers=layers, seed=1)


def test_regional_full_budget_equals_eager_across_prompts_and_turns():
    model, reference = twins()
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": True})
    for lengths in ([40, 31], [77, 60], [20, 9]):
        ids, mask = left_padded_batch(lengths, seed=lengths[0])
        got = generate_logits(compiled, ids, mask, 5, cache=LUKVCache(model.config, compression=0.0))
        assert_same_generation(got, generate_logits(reference, ids, mask, 5))
    for prefill_chunk in (None, 16):
        assert_same_conversation(compiled, reference, lengths=(30, 22), prefill_chunk=prefill_chunk)
    # prompt lengths, later turns, chunks of 16 (head_dim is 16 too): three layer graphs, one attention each
    assert counters["lukv"]["graphs_compiled"] == REGIONAL_GRAPHS
    assert counters["lukv"]["sdpa_rewritten"] == counters["lukv"]["graphs_compiled"]
    assert model._compiled_call_impl is None and all(layer._compiled_call_impl is None for layer in model.model.layers)


def test_regional_compresses_like_the_whole_model():
    model, whole_model = twins()
    regional = torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": True})
    whole = torch.compile(whole_model, backend="lukv", options={"inner": "aot_eager"})
    ids, mask = left_padded_batch([200, 161])
    caches = [LUKVCache(model.config, compression=0.8) for _ in range(2)]
    got = generate_logits(regional, ids, mask, 6, cache=caches[0])
    want = generate_logits(whole, ids, mask, 6, cache=caches[1])
    assert_same_generation(got, want)
    full = full_cache_nbytes(model.config, 2, 200 + 5, model.dtype)
    assert caches[0].nbytes() == caches[1].nbytes() < 0.3 * full  # really evicted: ~0.2 of the prompt kept
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        for row_a, row_b in zip(a.kept_positions(), b.kept_positions(), strict=True):
            assert all(torch.equal(x, y) for x, y in zip(row_a, row_b, strict=True))


def test_regional_batch_sizes_stay_within_the_recompile_limit():
    model, reference = twins(layers=2)
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": True})
    for lengths in ([30], [30, 21], [25, 30, 12], [9, 30, 28, 17], [14, 30]):
        ids, mask = left_padded_batch(lengths, seed=len(lengths))
        got = generate_logits(compiled, ids, mask, 3, cache=LUKVCache(model.config, compression=0.0))
        assert_same_generation(got, generate_logits(reference, ids, mask, 3))
    # one row (no padding, so no mask graph): 2 layer graphs; the second size recompiles chunk and decode with
    # the batch dynamic (4), the third size's first padded chunk once more (5); no later size adds one
    assert counters["lukv"]["graphs_compiled"] == 5


def test_regional_model_compile_in_place_and_hand_written_loop():
    model, reference = twins(layers=2, family="qwen2")
    model.compile(backend="lukv", options={"inner": "aot_eager", "regional": True})
    ids, mask = left_padded_batch([40, 31])
    assert_same_generation(generate_logits(model, ids, mask, 4, cache=LUKVCache(model.config, compression=0.0)),
                           generate_logits(reference, ids, mask, 4))
    cache = LUKVCache(model.config, compression=0.75, sink=2, window=4)
    with torch.no_grad():
        token = model(input_ids=ids[:1], cache=cache).logits[:, -1:].argmax(-1)
        token = model(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
    assert [len(p) for p in cache.layers[1].kept_positions()[0]] == [10 + 1, 10 + 1]


@pytest.mark.parametrize("make, message", [
    (tiny_gemma3, r"layers \[0, 2\] of this model use sliding-window attention"),
    (lambda: (lambda x: x + 1), "needs an nn.Module, not function"),
    (PlainAttentionModel, "PlainAttentionModel has no transformers decoder layers"),
])
def test_regional_refuses_what_it_cannot_compile_at_the_compile_call(make, message):
    with pytest.raises(RegionalCompileError, match=message):
        torch.compile(make(), backend="lukv", options={"inner": "aot_eager", "regional": True})
    assert counters["lukv"]["graphs_compiled"] == 0


def test_regional_without_a_lukv_cache_is_a_clear_error():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lukv", options={"inner": "eager", "regional": True})
    with torch.no_grad(), pytest.raises(Exception, match="reads no LUKVCache"):
        compiled(input_ids=torch.ones(1, 8, dtype=torch.long))


@pytest.mark.slow
def test_regional_full_budget_equals_eager_on_inductor():
    model, reference = twins()
    compiled = torch.compile(model, backend="lukv", options={"regional": True})  # default inner: inductor

    @settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(lengths=st.lists(st.integers(1, 120), min_size=2, max_size=2), seed=st.integers(0, 2**16))
    def check(lengths, seed):
        ids, mask = left_padded_batch(lengths, seed=seed)
        got = generate_logits(compiled, ids, mask, 6, cache=LUKVCache(model.config, compression=0.0))
        assert_same_generation(got, generate_logits(reference, ids, mask, 6))
        assert_same_conversation(compiled, reference, lengths, turns=((9, 4), (5, 3)))

    check()
    for lengths in ([30, 30], [30, 21]):  # then every kind of layer graph exists: no padding mask, and one
        ids, mask = left_padded_batch(lengths)
        generate_logits(compiled, ids, mask, 2, cache=LUKVCache(model.config, compression=0.0))
    assert counters["lukv"]["graphs_compiled"] == REGIONAL_GRAPHS
