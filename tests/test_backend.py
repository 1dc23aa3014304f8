"""The lukv backend end to end on tiny random models: exactness at full budget, graph rewrite counts,
compile counts, registration and option validation."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, left_padded_batch, tiny_gemma3, tiny_model
from torch._dynamo.utils import counters

from lukv_compile import LUKVCache, Profile
from lukv_compile.backend import lukv_backend


def generate_logits(model, ids, mask, steps, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def lukv_vs_eager(model, ids, mask, steps, **options):
    tokens, logits = generate_logits(model, ids, mask, steps)
    model.compile(backend="lukv", options={"inner": "aot_eager", **options})
    lukv_tokens, lukv_logits = generate_logits(model, ids, mask, steps)
    return (tokens, logits), (lukv_tokens, lukv_logits)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking recompiles: too slow
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    layers=st.integers(1, 3),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 2), (4, 1)]),  # MHA, GQA, GQA, MQA
    head_dim=st.sampled_from([16, 32, 64]),
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_full_budget_equals_eager(family, layers, heads, head_dim, lengths, seed):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(family, layers, heads[0], heads[1], head_dim, seed=seed)
    ids, mask = left_padded_batch(lengths, seed=seed)
    (tokens, logits), (lukv_tokens, lukv_logits) = lukv_vs_eager(model, ids, mask, 8, compression=0.0)
    # Logits of the prefill and 7 decode steps, over the real (non-padded) rows.
    torch.testing.assert_close(lukv_logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(lukv_tokens, tokens)
    assert counters["lukv"]["sdpa_rewritten"] == (layers if max(lengths) == 1 else 2 * layers)


class PlainAttentionModel(torch.nn.Module):
    """A plain PyTorch model (no transformers) that keeps its K/V in a LUKVCache and calls SDPA."""

    def __init__(self, dim=32, heads=4, kv_heads=2, layers=2, vocab=64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim) for _ in range(layers))
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, cache):
        x = self.embed(tokens)
        b, t, _ = x.shape
        for i, proj in enumerate(self.qkv):
            q, k, v = proj(x).view(b, t, -1, self.head_dim).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            k, v = cache.update(k, v, i)
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True).transpose(1, 2).reshape(
                b, t, -1)
        return self.out(x)


class DenseCache:
    def __init__(self):
        self.kv = {}

    def update(self, k, v, i):
        if i in self.kv:
            k, v = torch.cat([self.kv[i][0], k], 2), torch.cat([self.kv[i][1], v], 2)
        self.kv[i] = (k, v)
        return k, v


def test_plain_pytorch_module_full_budget():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = PlainAttentionModel().eval()
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=32)
    tokens = torch.randint(0, 64, (2, 40))
    cache = LUKVCache(config, compression=0.0)
    cache.prepare(input_ids=tokens, max_new_tokens=8)
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    dense = DenseCache()
    with torch.no_grad():
        step_tokens = tokens
        for _ in range(9):
            got, want = compiled(step_tokens, cache), model(step_tokens, dense)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            step_tokens = want[:, -1:].argmax(-1)
    assert counters["lukv"]["sdpa_rewritten"] == 4


def spy_backend(graphs):
    def backend(gm, example_inputs, **kwargs):
        compiled = lukv_backend(gm, example_inputs, options={"inner": "eager"})
        graphs.append(gm)
        return compiled
    return backend


def test_graph_rewrite_counts_and_no_sdpa_left():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([30, 20])
    cache = LUKVCache(model.config, compression=0.5)
    graphs = []
    model.compile(backend=spy_backend(graphs))
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert len(graphs) == 2  # prefill + one decode graph for every decode step
    prefill, decode = graphs

    def count(gm, target):
        return sum(node.op == "call_function" and node.target == target for node in gm.graph.nodes)

    assert count(prefill, torch.ops.lukv.evict_prefill.default) == 3
    assert count(prefill, F.scaled_dot_product_attention) == 3  # prefill attention stays exact SDPA
    assert count(decode, torch.ops.lukv.decode_attention.default) == 3
    assert count(decode, torch.ops.lukv.append_kv.default) == 3
    assert count(decode, F.scaled_dot_product_attention) == 0
    for gm in graphs:
        assert count(gm, torch.ops.lukv.cache_marker.default) == 0


def test_one_generate_compiles_at_most_twice():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([50, 37])
    model.compile(backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert counters["lukv"]["graphs_compiled"] == 2
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True)
    assert counters["lukv"]["graphs_compiled"] == 2  # same shapes: nothing recompiles


def test_inductor_end_to_end_compressed():
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([64, 50])
    sequences_ref, _ = generate_logits(model, ids, mask, 4)
    model.compile(backend="lukv", options={"compression": 0.0})
    sequences, _ = generate_logits(model, ids, mask, 4)
    assert torch.equal(sequences, sequences_ref)
    model.compile(backend="lukv", options={"compression": 0.75})
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
    layer = out.cache.layers[0]
    assert layer.seg_len.tolist() == (layer.budget + 3).tolist()  # kept + 3 appended decode tokens


def test_gemma3_sliding_layers_stay_exact(caplog):
    model = tiny_gemma3()
    ids, mask = left_padded_batch([40, 33])
    (tokens, logits), (lukv_tokens, lukv_logits) = lukv_vs_eager(model, ids, mask, 6, compression=0.0)
    torch.testing.assert_close(lukv_logits, logits, rtol=1e-4, atol=1e-4)
    assert counters["lukv"]["sdpa_rewritten"] == 2  # the one global layer, prefill + decode
    assert counters["lukv"]["sdpa_left_exact"] == 4  # two sliding layers, prefill + decode
    assert "left exact" in caplog.text


def test_backend_registered_once_both_ways():
    assert "lukv" in torch._dynamo.list_backends()
    # Fresh interpreters: entry point first (torch imports the package), then import-first.
    use = "f = torch.compile(lambda x: x + 1, backend='lukv'); f(torch.ones(2))"
    entry_first = f"import torch; {use}; import lukv_compile"
    import_first = f"import lukv_compile, torch; {use}"
    for code in (entry_first, import_first):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("options, message", [
    ({"bogus": 1}, "unknown lukv option"),
    ({"compression": 1.0}, "compression must be"),
    ({"compression": -0.1}, "compression must be"),
    ({"scorer": "h2o"}, "unknown scorer"),
    ({"inner": "tvm"}, "inner='tvm' is not allowed"),
    ({"sink": -1}, "sink must be"),
    ({"policy": "pyramid"}, "policy='pyramid' is not allowed"),
])
def test_bad_options_raise_before_work(options, message):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([10])
    model.compile(backend="lukv", options=options)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert counters["lukv"]["graphs_compiled"] == 0


def test_profile_model_mismatch_is_refused():
    model = tiny_model("llama", layers=2, kv_heads=2)
    with pytest.raises(ValueError, match="profile is for 3 layers x 2 KV heads"):
        LUKVCache(model.config, profile=Profile.uniform(3, 2))
    with pytest.raises(ValueError, match="4 KV heads"):
        LUKVCache(model.config, profile=Profile.uniform(2, 4))
    with pytest.raises(ValueError, match="scorer='keydiff' but the profile was made with 'snapkv'"):
        LUKVCache(model.config, profile=Profile.uniform(2, 2, scorer="snapkv"), scorer="keydiff")


def test_short_context_keeps_everything_and_is_exact():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([30, 25])  # shorter than sink 4 + window 32
    (tokens, logits), (lukv_tokens, lukv_logits) = lukv_vs_eager(model, ids, mask, 5, compression=0.9)
    torch.testing.assert_close(lukv_logits, logits, rtol=1e-4, atol=1e-4)


def test_generation_longer_than_cache_is_refused():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([50])
    cache = LUKVCache(model.config, compression=0.5)
    cache.prepare(attention_mask=mask, max_new_tokens=2)
    compiled = torch.compile(model, backend="lukv", options={"inner": "eager"})
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for step in range(2):
            compiled(input_ids=ids[:, :1], position_ids=torch.tensor([[50 + step]]), past_key_values=cache)
        with pytest.raises(RuntimeError, match="LUKVCache is full"):
            compiled(input_ids=ids[:, :1], position_ids=torch.tensor([[52]]), past_key_values=cache)


def test_cache_outside_backend_gives_clear_error():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([20])
    cache = LUKVCache(model.config, compression=0.5)
    with pytest.raises(RuntimeError, match="outside the lukv backend"):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2)
    unprepared = LUKVCache(model.config, compression=0.5)
    with pytest.raises(RuntimeError, match="not prepared"):
        model(input_ids=ids, past_key_values=unprepared)


def test_cache_reuse_needs_reset_and_seq_length_counts_padding():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([40, 31])
    cache = LUKVCache(model.config, compression=0.5)
    model.compile(backend="lukv", options={"inner": "eager"})
    first = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                           do_sample=False)
    assert cache.get_seq_length() == 40 + 4  # padded prompt + the decode steps (last token not fed back)
    with pytest.raises(ValueError, match="call cache.reset"):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5)
    cache.reset()
    again = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                           do_sample=False)
    assert torch.equal(first, again)
