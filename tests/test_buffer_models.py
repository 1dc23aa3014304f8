"""Models that keep their own KV buffers (gpt-fast, torchtune, prefix slices), compressed with one line.

Exactness at compression 0 on the default inner compiler (inductor) for prompt lengths, chunkings, decode
steps and batches; at 0.8 the output equals the masked simulation of the same evictions and the dense
buffers hold no memory; graph counters say how many attentions were rewritten; anything the pass cannot
prove is refused, at compile time or before the cache changes.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from buffer_models import gfs, run_chunks, step_inputs, tiny
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import lukv_compile
from lukv_compile import LUKVCacheError
from lukv_compile.testing.simulation import kept_mask

PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
MAX_SEQ = 96


def assert_same_logits(got: list[torch.Tensor], want: list[torch.Tensor], pads: torch.Tensor | None = None) -> None:
    """Equal logits in every forward; with `pads` [B] (left padding of each row), at real tokens only: what a
    padding token's query reads is left to the model (torchtune lets it read itself)."""
    assert len(got) == len(want)
    start = 0
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        if pads is not None:
            real = (torch.arange(start, start + a.shape[1])[None, :] >= pads[:, None])[..., None]
            a, b = a * real, b * real
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, s=step: f"forward {s}: {m}")
        start += a.shape[1]


def split(length: int, cuts: list[int]) -> list[int]:
    """`length` tokens cut into chunks at the given (sorted, distinct) points."""
    points = [0, *sorted({c for c in cuts if 0 < c < length}), length]
    return [b - a for a, b in zip(points, points[1:], strict=False)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpt_fast", "torchtune"])
def test_full_budget_equals_eager_on_inductor(variant):
    model = tiny(variant)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0})  # default inner: inductor

    @settings(max_examples=4, **PROPERTY)
    @given(length=st.integers(2, 60), cuts=st.lists(st.integers(1, 59), max_size=2), steps=st.integers(0, 4),
           batch=st.sampled_from([1, 2]), pad=st.integers(0, 20), seed=st.integers(0, 2**16))
    def check(length, cuts, steps, batch, pad, seed):
        prompt = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
        chunks = split(length, cuts)
        # torchtune's convention: the second row left-padded within the first chunk
        pads = torch.tensor([0, min(pad, chunks[0] - 1)])[:batch] if variant == "torchtune" else None
        want = run_chunks(model, prompt, chunks, steps, MAX_SEQ, pads)
        assert_same_logits(run_chunks(compiled, prompt, chunks, steps, MAX_SEQ, pads), want, pads)

    check()
    for batch in (1, 2):  # then every graph exists: a chunk and a decode step per batch size
        run_chunks(compiled, torch.zeros(batch, 7, dtype=torch.long), [4, 3], 1, MAX_SEQ)
    assert counters["lukv"]["graphs_compiled"] == 4
    assert counters["lukv"]["buffer_sdpa_rewritten"] == 4 * 4  # every layer of every graph
    assert gfs.dense_kv_bytes(model) == 0


def test_prefix_slice_equals_eager():
    model = tiny("prefix", layers=2)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    prompt = torch.randint(0, 128, (2, 37))
    assert_same_logits(run_chunks(compiled, prompt, [37], 5, MAX_SEQ), run_chunks(model, prompt, [37], 5, MAX_SEQ))
    assert counters["lukv"]["buffer_sdpa_rewritten"] == 2 * counters["lukv"]["graphs_compiled"]
    # a second prompt chunk after the first: SDPA's is_causal would align it top-left, wrong in eager too
    with pytest.raises(LUKVCacheError, match="not causal over the written positions"):
        run_chunks(compiled, prompt, [20, 17], 0, MAX_SEQ)


def test_index_copy_write_equals_eager():
    model = tiny("index_copy", layers=2)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    prompt = torch.randint(0, 128, (1, 33))
    assert_same_logits(run_chunks(compiled, prompt, [20, 13], 3, MAX_SEQ),
                       run_chunks(model, prompt, [20, 13], 3, MAX_SEQ))
    assert counters["lukv"]["buffer_sdpa_rewritten"] == 2 * counters["lukv"]["graphs_compiled"] > 0


# ---- compressed: equal to a dense model that masks exactly what each head evicted


def masked_sdpa(kept: dict[int, torch.Tensor], layers: int, prompt_len: int):
    """SDPA for the eager model that, after the prompt, hides from each head the prompt tokens its layer evicted
    (layer i is the i-th call of each forward)."""
    calls = iter(range(10**9))

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        layer = next(calls) % layers
        group = q.shape[1] // kept[layer].shape[1]
        visible = attn_mask.expand(q.shape[0], q.shape[1], -1, -1).clone()
        if q.shape[2] < prompt_len:  # a decode step: the prompt as this layer's heads keep it
            heads = kept[layer][:, :, :prompt_len].repeat_interleave(group, dim=1)
            visible[..., :prompt_len] &= heads[:, :, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    return attend


def test_compressed_equals_masked_simulation(monkeypatch):
    model = tiny("torchtune", layers=4)
    profile = lukv_compile.Profile.uniform(4, 2, scorer="snapkv", sink=4, window=8)
    profile.prune[:, 0, 0] *= 0.5  # heads keep different amounts
    compiled = torch.compile(model, backend="lukv",
                             options={"compression": 0.8, "profile": profile, "allow_other_model": True,
                                      "inner": "aot_eager"})
    prompt = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(3))
    pads = torch.tensor([0, 9])  # the second row left-padded (torchtune's convention)
    got = run_chunks(compiled, prompt, [80], 6, MAX_SEQ, pads)
    cache = lukv_compile.buffer_cache(compiled)
    kept = {i: kept_mask(layer, 2, MAX_SEQ) for i, layer in enumerate(cache.layers)}
    held = sum(int(m[:, :, :80].sum()) for m in kept.values())
    assert held < 0.3 * 4 * 2 * 2 * 80  # really compressed: about 20% of the prompt kept (more by some heads)
    assert gfs.dense_kv_bytes(model) == 0  # the model's own buffers hold nothing: the ragged cache holds the tokens
    buffers = 2 * 2 * 4 * 2 * MAX_SEQ * 16 * 4  # K and V, batch 2, 4 layers, 2 KV heads, head_dim 16, fp32
    assert 0 < cache.nbytes() < 0.45 * buffers  # kept tokens plus each head's room to grow (MIN_ROOM)
    monkeypatch.setattr(gfs, "F", SimpleNamespace(scaled_dot_product_attention=masked_sdpa(kept, 4, 80),
                                                  silu=F.silu))
    want = run_chunks(model, prompt, [80], 6, MAX_SEQ, pads)
    assert_same_logits(got, want, pads)
    assert all(not m[1, :, :9].any() for m in kept.values())  # no padding slot is held


def test_second_turn_and_new_sequence():
    model = tiny("gpt_fast", layers=2)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    prompt = torch.randint(0, 128, (1, 30))
    # two turns: the second chunk continues at the model's own position counter
    assert_same_logits(run_chunks(compiled, prompt, [20, 10], 2, MAX_SEQ), run_chunks(model, prompt, [20, 10], 2,
                                                                                       MAX_SEQ))
    cache = lukv_compile.buffer_cache(compiled)
    assert cache.layers[0].seen == 32
    run_chunks(compiled, prompt[:, :5], [5], 0, MAX_SEQ)  # a new sequence at position 0 starts afresh
    assert cache.layers[0].seen == 5
    with pytest.raises(LUKVCacheError, match="must start at 0 .* or at 5"), torch.no_grad():
        compiled(*step_inputs(compiled, prompt[:, :1], 9))
    assert cache.layers[0].seen == 5  # refused before the cache changed


# ---- strict: what the pass cannot prove is refused


class SlidingMaskModel(gfs.Transformer):
    """A mask computed in the graph (a sliding window): not provably causal over the filled positions."""

    def forward(self, idx, input_pos):
        window = torch.arange(self.max_seq_length)[None, :] > (input_pos[:, None] - 8)
        mask = self.causal_mask[None, None, input_pos] & window
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))


class SequenceRepeatKVCache(gfs.KVCache):
    def update(self, input_pos, k_val, v_val):
        k_out, v_out = super().update(input_pos, k_val, v_val)
        return k_out.repeat_interleave(1, dim=2), v_out  # a step along the positions, not a GQA repeat


class MatmulKVCache(gfs.KVCache):
    def update(self, input_pos, k_val, v_val):
        k_out, v_out = super().update(input_pos, k_val, v_val)
        self.k_cache.mul_(1.0)  # another use of the buffer than the attention that reads it
        return k_out, v_out


def test_unprovable_models_are_refused_at_compile_time():
    args = gfs.ModelArgs(vocab_size=128, dim=64, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=128)
    sliding = SlidingMaskModel(args).eval()
    sliding.setup_caches(1, 32)
    compiled = torch.compile(sliding, backend="lukv", options={"inner": "aot_eager"})
    with pytest.raises(Exception, match="mask of the attention over the KV buffer layers.0.attention.kv_cache."
                                        "k_cache is computed in the graph"), torch.no_grad():
        compiled(torch.zeros(1, 4, dtype=torch.long), torch.arange(4))

    refusals = {MatmulKVCache: "kv_cache.k_cache is read by attention and also used by call_method mul_",
                SequenceRepeatKVCache: r"kv_cache.k_cache goes through call_method repeat_interleave\(.*\) before "
                                       "attention; only a repetition of its heads"}
    for cache_class, message in refusals.items():
        torch._dynamo.reset()
        other = tiny("gpt_fast", layers=2)
        other.kv_cache_class = cache_class
        other.setup_caches(1, 32)
        compiled = torch.compile(other, backend="lukv", options={"inner": "aot_eager"})
        with pytest.raises(Exception, match=message), torch.no_grad():
            compiled(torch.zeros(1, 4, dtype=torch.long), torch.arange(4))


@pytest.mark.parametrize("options, message", [
    ({"prefill_chunk": 16}, "prefill_chunk=16 is how generate"),
    ({"scorer": "expected_attention", "compression": 0.8}, "needs the model's RoPE frequencies"),
])
def test_options_a_buffer_model_cannot_honour_are_refused(options, message):
    model = tiny("gpt_fast", layers=2)  # no transformers config: no RoPE frequencies lukv could read
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager", **options})
    with pytest.raises(Exception, match=message):
        run_chunks(compiled, torch.zeros(1, 8, dtype=torch.long), [8], 0, MAX_SEQ)


def test_mask_not_causal_is_refused_before_the_cache_changes():
    model = tiny("torchtune", layers=2)
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    model.setup_caches(1, 32)
    tokens, positions = torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None]
    bidirectional = torch.ones(1, 6, 32, dtype=torch.bool)
    with pytest.raises(LUKVCacheError, match="not causal over the written positions"), torch.no_grad():
        compiled(tokens, positions, bidirectional)
    assert lukv_compile.buffer_cache(compiled).layers[0].seen == 0


def test_buffer_cache_of_a_model_without_buffers_is_a_clear_error():
    with pytest.raises(ValueError, match="keeps no KV buffers"):
        lukv_compile.buffer_cache(torch.compile(tiny("gpt_fast", layers=1), backend="lukv"))
    with pytest.raises(ValueError, match="was not compiled with the lukv backend"):
        lukv_compile.buffer_cache(tiny("gpt_fast", layers=1))
