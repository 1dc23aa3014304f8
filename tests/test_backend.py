"""The lukv backend end to end on tiny random models: exactness at full budget on the default inner compiler
(inductor), the card's `torch.compile(model, ...)` form, graph rewrite counts, strict matching,
sliding-window configs, registration and option validation."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import (
    FAMILIES,
    PlainAttentionModel,
    assert_same_conversation,
    assert_same_generation,
    conversation,
    generate_logits,
    left_padded_batch,
    tiny_gemma3,
    tiny_model,
)
from torch._dynamo.utils import counters
from transformers import DynamicCache

from lukv_compile import LUKVCache
from lukv_compile.passes import rewrite_attention
from lukv_compile.passes.find_attention import UnsupportedAttention
from lukv_compile.runtime.layer import RaggedLayer

# One shared compiled model per test, many inputs: shrinking would only recompile.
PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


# Every family on the default inner compiler (inductor), 4 layers, one attention shape each.
INDUCTOR_MODELS = {
    "llama": dict(q_heads=4, kv_heads=2, head_dim=16),  # GQA
    "mistral": dict(q_heads=4, kv_heads=4, head_dim=16),  # MHA
    "qwen2": dict(q_heads=4, kv_heads=1, head_dim=32),  # MQA
    "qwen3": dict(q_heads=6, kv_heads=2, head_dim=16),  # GQA, q/k norms
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(INDUCTOR_MODELS))
def test_full_budget_equals_eager_on_inductor(family):
    model = tiny_model(family, layers=4, **INDUCTOR_MODELS[family], seed=1)
    # The reference is the model itself: compiling it with lukv leaves it the plain model.
    reference = model
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0})  # the card's form, default inner

    @settings(max_examples=3, **PROPERTY)
    @given(lengths=st.lists(st.integers(1, 120), min_size=2, max_size=2), seed=st.integers(0, 2**16))
    def check(lengths, seed):
        ids, mask = left_padded_batch(lengths, seed=seed)
        assert_same_generation(generate_logits(compiled, ids, mask, 6), generate_logits(reference, ids, mask, 6))
        # later turns on one cache: the masks are cut to each new chunk (compiler/chunks.prepare_chunk)
        assert_same_conversation(compiled, reference, lengths, turns=((9, 4), (5, 3)))

    check()
    for lengths in ([30, 30], [30, 21]):  # then every graph a batch of 2 makes exists: padded and not
        ids, mask = left_padded_batch(lengths)
        generate_logits(compiled, ids, mask, 2)
    # regional (the default here): one layer per graph: chunks with a padding mask, without one, decode steps
    assert compiled.forward.regional
    assert counters["lukv"]["graphs_compiled"] == 3
    assert counters["lukv"]["sdpa_rewritten"] == counters["lukv"]["graphs_compiled"]


@settings(max_examples=10, **PROPERTY)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    layers=st.integers(1, 3),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 2), (4, 1)]),  # MHA, GQA, GQA, MQA
    head_dim=st.sampled_from([16, 32]),
    lengths=st.lists(st.integers(1, 150), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_full_budget_equals_eager_any_shape(family, layers, heads, head_dim, lengths, seed):
    torch._dynamo.reset()
    model = tiny_model(family, layers, heads[0], heads[1], head_dim, seed=seed)
    ids, mask = left_padded_batch(lengths, seed=seed)
    want = generate_logits(model, ids, mask, 6)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    assert_same_generation(generate_logits(compiled, ids, mask, 6), want)


def test_card_form_compresses_and_reports_real_bytes():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([120, 90])
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    out = compiled.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            return_dict_in_generate=True)
    assert isinstance(out.cache, LUKVCache)
    assert compiled.forward.regional  # the default for a transformers model without sliding layers
    # one decoder layer per graph: chunks with a padding mask, decode steps
    assert counters["lukv"]["graphs_compiled"] == 2
    assert counters["lukv"]["sdpa_rewritten"] == counters["lukv"]["graphs_compiled"]
    held = [len(p) for p in out.cache.layers[0].kept_positions()[0]]
    assert max(held) < 120 * 0.2 + 36 + 5  # budget (sink + window floor) + decode tokens
    assert model._compiled_call_impl is None  # the original module stays uncompiled outside generate()


def test_card_form_hand_written_loop_compresses():
    model = tiny_model("llama", layers=2)
    ids, _ = left_padded_batch([100])
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    cache = LUKVCache(model.config, compression=0.75, sink=2, window=4)
    with torch.no_grad():
        token = compiled(input_ids=ids, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(3):
            token = compiled(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
    assert [len(p) for p in cache.layers[1].kept_positions()[0]] == [25 + 3, 25 + 3]
    assert cache.get_seq_length() == 103


def test_model_compile_in_place_still_works():
    model = tiny_model("qwen2", layers=2)
    ids, mask = left_padded_batch([40, 31])
    want = generate_logits(model, ids, mask, 4)
    model.compile(backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    assert_same_generation(generate_logits(model, ids, mask, 4), want)


def test_plain_pytorch_module_full_budget():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = PlainAttentionModel().eval()
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=32)
    tokens = torch.randint(0, 64, (2, 40))
    cache = LUKVCache(config, compression=0.0)
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    dense = PlainAttentionModel.DenseCache()
    with torch.no_grad():
        step_tokens = tokens
        for chunk in (9, 1, 1, 5, 1):
            got, want = compiled(step_tokens, cache), model(step_tokens, dense)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            step_tokens = torch.randint(0, 64, (2, chunk))
    assert counters["lukv"]["sdpa_rewritten"] == 4  # 2 layers x (a graph for chunks of any length, one for decode)


def count(gm, target):
    return sum(node.op == "call_function" and node.target == target for node in gm.graph.nodes)


def test_graph_rewrite_counts_and_no_sdpa_left(monkeypatch):
    from lukv_compile.compiler import backend

    graphs = []

    def spy(gm, buffers_served=0):
        sites = rewrite_attention(gm, buffers_served)
        graphs.append(gm)
        return sites

    monkeypatch.setattr(backend, "rewrite_attention", spy)
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([30, 20])
    model.compile(backend="lukv", options={"inner": "eager", "regional": False})
    model.generate(input_ids=ids, attention_mask=mask, cache=LUKVCache(model.config, compression=0.5),
                   max_new_tokens=4, do_sample=False)
    assert len(graphs) == 2  # the prompt, and one graph for every decode step
    for gm in graphs:
        assert count(gm, torch.ops.lukv.attend.default) == 3
        assert count(gm, F.scaled_dot_product_attention) == 0
        assert count(gm, torch.ops.lukv.cache_marker.default) == 0


def test_policy_changes_do_not_recompile():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": False})
    for compression, scorer, policy in [(0.8, "snapkv", "lukv"), (0.5, "keydiff", "adakv"), (0.3, "streaming", "lukv"),
                                        (0.9, "expected_attention", "lukv"), (0.0, "snapkv", "lukv")]:
        for length in (50, 61):
            ids, mask = left_padded_batch([length, length - 7])
            cache = LUKVCache(model.config, compression=compression, scorer=scorer, policy=policy)
            compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=3 + length % 5,
                              do_sample=False)
    # chunks of any length, and decode: the policy is never part of a graph
    assert counters["lukv"]["graphs_compiled"] == 2


def test_two_graphs_for_the_life_of_a_process(monkeypatch):
    from torch._dynamo.backends import debugging

    compiled_graphs, aot_eager = [], debugging.aot_eager

    def counting_aot_eager(gm, example_inputs):
        compiled_graphs.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(debugging, "aot_eager", counting_aot_eager)
    model = tiny_model("llama", layers=2)
    requests = [(*left_padded_batch([length], seed=length), new_tokens)
                for length, new_tokens in ((40, 3), (73, 6), (21, 1), (96, 4))]
    # before compiling: generate then compresses
    eager = [generate_logits(model, *request) for request in requests]
    eager_turns = conversation(model, DynamicCache(config=model.config))
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": False})
    for compression in (0.0, 0.5, 0.8):
        for scorer in ("snapkv", "keydiff"):
            for request, want in zip(requests, eager, strict=True):
                cache = LUKVCache(model.config, compression=compression, scorer=scorer)
                got = generate_logits(compiled, *request, cache=cache)
                if compression == 0.0:
                    assert_same_generation(got, want)
            for prefill_chunk in (None, 16):  # later turns, whole or in chunks, on the prompt's graph
                cache = LUKVCache(model.config, compression=compression, scorer=scorer, prefill_chunk=prefill_chunk)
                got_turns = conversation(compiled, cache)
                if compression == 0.0:
                    for got, want in zip(got_turns, eager_turns, strict=True):
                        assert_same_generation(got, want)
    assert len(compiled_graphs) == 2  # a chunk of any length (prompts, later turns), and a decode step


def test_gemma3_sliding_layers_stay_exact(caplog):
    model = tiny_gemma3()
    ids, mask = left_padded_batch([40, 33])
    want = generate_logits(model, ids, mask, 6)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    assert_same_generation(generate_logits(compiled, ids, mask, 6), want)
    graphs = counters["lukv"]["graphs_compiled"]  # the sliding layers' growing caches recompile once more
    assert counters["lukv"]["sdpa_rewritten"] == graphs  # the one global layer
    assert counters["lukv"]["sdpa_left_exact"] == 2 * graphs  # two sliding layers
    assert "left exact" in caplog.text


def test_sliding_window_configs_stay_exact_at_any_compression():
    model = tiny_model("qwen2", layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    ids, mask = left_padded_batch([60, 45])
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    cache = generate_logits(compiled, ids, mask, 8)[2].cache
    assert [isinstance(layer, RaggedLayer) for layer in cache.layers] == [True, False]  # layer 1 slides
    assert cache.layers[1].keys.shape[2] == 15  # transformers' own sliding layer: the window, exact
    assert max(len(p) for p in cache.layers[0].kept_positions()[0]) < 60


def test_a_model_that_slides_everywhere_is_refused_before_work():
    model = tiny_model("mistral", layers=2, sliding_window=16)  # Mistral/Phi-3 style: no layer_types
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    ids, mask = left_padded_batch([30])
    with pytest.raises(ValueError, match="sliding_window=16.*nothing to compress"):
        compiled.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert counters["lukv"]["graphs_compiled"] == 0


def test_sliding_window_config_is_exact_at_full_budget():
    model = tiny_model("qwen2", layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    ids, mask = left_padded_batch([60, 45])
    want = generate_logits(model, ids, mask, 8)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    assert_same_generation(generate_logits(compiled, ids, mask, 8), want)


class SlicingAttention(PlainAttentionModel):
    """Attends only to the last 8 cached keys: a use of the cache the rewrite cannot honour."""

    def attention(self, q, k, v, t):
        return F.scaled_dot_product_attention(q, k[:, :, -8:], v[:, :, -8:], enable_gqa=True)


class MatmulAttention(PlainAttentionModel):
    def attention(self, q, k, v, t):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


@pytest.mark.parametrize("model_cls, message", [
    (SlicingAttention, "layer 0's cached K/V go through call_function getitem"),
    (MatmulAttention, "go through call_method repeat_interleave"),
])
def test_unsupported_uses_of_the_cache_are_compile_errors(model_cls, message):
    from types import SimpleNamespace

    model = model_cls().eval()
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=32)
    compiled = torch.compile(model, backend="lukv", options={"inner": "eager"})
    with torch.no_grad(), pytest.raises(Exception, match=message) as raised:
        compiled(torch.randint(0, 64, (1, 20)), LUKVCache(config, compression=0.0))
    assert isinstance(raised.value.__cause__ or raised.value, UnsupportedAttention) or "UnsupportedAttention" in str(
        raised.value)


def test_backend_registered_once_both_ways():
    assert "lukv" in torch._dynamo.list_backends()
    # Fresh interpreters: entry point first (torch imports the package), then import-first.
    use = ("import torch.nn.functional as F; from tiny_models import tiny_model; from lukv_compile import LUKVCache; "
           "m = tiny_model(); c = torch.compile(m, backend='lukv', options={'inner': 'eager'}); "
           "torch.set_grad_enabled(False); c(input_ids=torch.ones(1, 5, dtype=torch.long), cache=LUKVCache(m.config))")
    entry_first = f"import torch; {use}"
    import_first = f"import lukv_compile, torch; {use}"
    for code in (entry_first, import_first):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=180, cwd="tests")


@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, "unknown lukv option"),
    ({"compression": 1.0}, "compression=1.0 is not allowed"),
    ({"compression": -0.1}, "compression=-0.1 is not allowed"),
    ({"scorer": "h2o"}, "scorer='h2o' is not allowed"),
    ({"inner": "tvm"}, "inner='tvm' is not allowed"),
    ({"sink": -1}, "sink=-1 is not allowed"),
    ({"window": 2.5}, "window=2.5 is not allowed"),
    ({"policy": "pyramid"}, "policy='pyramid' is not allowed"),
    ({"evict": "sometimes"}, "evict='sometimes' is not allowed"),
    ({"profile": 3}, "profile='int' is not allowed"),
    ({"mode": "fast"}, "mode='fast' is not allowed"),
    ({"mode": "reduce-overhead", "inner": "aot_eager"}, "needs inner='inductor'"),
])
def test_bad_options_raise_at_compile_call(options, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        torch.compile(model, backend="lukv", options=options)
    with pytest.raises(ValueError, match=message):
        model.compile(backend="lukv", options=options)
    assert counters["lukv"]["graphs_compiled"] == 0


def test_mode_reaches_inductor_with_cuda_graphs_partitioned_around_attend(monkeypatch):
    """options={"mode": ...} (torch.compile takes mode= or options=, not both) becomes inductor's config;
    with CUDA graphs, partitioned around lukv::attend, which is tagged unsafe to capture."""
    import torch._inductor.compile_fx as compile_fx

    patches = []
    monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, inputs, config_patches=None: (
        patches.append(config_patches), gm.forward)[1])
    model = tiny_model("llama")
    ids = torch.randint(1, 100, (1, 8))
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "mode": "reduce-overhead",
                                                             "regional": False})
    with torch.no_grad():
        logits = compiled(input_ids=ids, cache=LUKVCache(model.config, compression=0.0)).logits
        expected = model(input_ids=ids, cache=DynamicCache(config=model.config)).logits
    torch.testing.assert_close(logits, expected)
    assert patches == [{"triton.cudagraphs": True, "graph_partition": True}]
    assert torch.Tag.cudagraph_unsafe in torch.ops.lukv.attend.default.tags
    assert counters["lukv"]["sdpa_rewritten"] == model.config.num_hidden_layers


def test_no_cache_is_a_clear_error_not_a_silent_uncompressed_run():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lukv", options={"inner": "eager"})
    with torch.no_grad(), pytest.raises(Exception, match="reads no LUKVCache"):
        compiled(input_ids=torch.ones(1, 8, dtype=torch.long))


def test_a_forward_that_tracks_gradients_is_a_clear_error():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    with pytest.raises(Exception, match="tracks gradients.*torch.no_grad"):
        compiled(input_ids=torch.ones(1, 8, dtype=torch.long), cache=LUKVCache(model.config))
    with torch.no_grad():  # and the same compiled model then works
        out = compiled(input_ids=torch.ones(1, 8, dtype=torch.long), cache=LUKVCache(model.config))
    assert out.logits.shape[1] == 8
