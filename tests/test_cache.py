"""The cache across turns and chunks, beams, growth, eviction points, and errors that never poison."""

import logging
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, left_padded_batch, tiny_model
from torch._dynamo.utils import counters
from transformers import DynamicCache

from lukv_compile import LUKVCache, LUKVCacheError, Profile, ProfileError
from lukv_compile.config import config_fingerprint
from lukv_compile.runtime.layer import DECODE_SLACK, RaggedLayer

PROPERTY = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


def lukv(model, **options):
    """The whole model compiled (regional=False): these tests count its graphs."""
    return torch.compile(model, backend="lukv", options={"inner": "aot_eager", "regional": False, **options})


def chunked_logits(forward, ids, mask, cuts, cache):
    """Feed ids [B, T] in chunks ending at `cuts`; logits of every position, as one eager pass gives them."""
    logits, start = [], 0
    with torch.no_grad():
        for end in [*cuts, ids.shape[1]]:
            if end > start:
                logits.append(forward(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=cache).logits)
            start = end
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_any_split_into_chunks_equals_one_eager_pass(family):
    model = tiny_model(family, layers=2, q_heads=4, kv_heads=2, seed=2)
    compiled = lukv(model)

    @settings(max_examples=6, **PROPERTY)
    @given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
           cuts=st.lists(st.integers(1, 90), max_size=4), extra=st.integers(1, 30), seed=st.integers(0, 999))
    def check(lengths, cuts, extra, seed):
        ids, mask = left_padded_batch([n + extra for n in lengths], seed=seed)
        prompt = max(lengths)  # the first chunk holds every row's padding (left padding)
        cuts = sorted({c for c in cuts if prompt <= c < ids.shape[1]} | {prompt})
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        got = chunked_logits(compiled, ids, mask, cuts, LUKVCache(model.config, compression=0.0))
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)

    check()


def two_turn_generate(model, cache, ids, mask, turn2, **kwargs):
    """transformers' multi-turn idiom: the second generate gets the whole history and the same cache."""
    out1 = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False, **kwargs)
    history = torch.cat([out1, turn2], dim=1)
    mask2 = torch.cat([mask, torch.ones(mask.shape[0], history.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    return model.generate(input_ids=history, attention_mask=mask2, cache=cache, max_new_tokens=6, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


def test_multi_turn_generate_equals_eager_at_full_budget():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([30, 22])
    turn2 = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = two_turn_generate(model, DynamicCache(config=model.config), ids, mask, turn2)
    got = two_turn_generate(lukv(model), LUKVCache(model.config, compression=0.0), ids, mask, turn2)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(got.sequences, want.sequences)


def test_compressed_cache_serves_a_second_turn_in_one_forward():
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([120])
    cache = LUKVCache(model.config, compression=0.8, sink=2, window=4)
    compiled = lukv(model)
    with torch.no_grad():
        compiled(input_ids=ids, cache=cache)
        kept = [len(p) for p in cache.layers[0].kept_positions()[0]]
        compiled(input_ids=torch.randint(1, 128, (1, 17)), cache=cache)  # one forward, 17 new tokens
    held = cache.layers[0].kept_positions()[0]
    assert [len(p) for p in held] == [k + 17 for k in kept] == [24 + 17] * 2
    assert all(torch.equal(p[-17:], torch.arange(120, 137)) for p in held)  # true positions, not counts
    assert cache.get_seq_length() == 137


@pytest.mark.parametrize("num_beams, sequences", [(2, 1), (3, 2)])
def test_beam_search_equals_eager_at_full_budget(num_beams, sequences):
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([25, 18])
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, num_return_sequences=sequences, do_sample=False)
    want = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(lukv(model, compression=0.0).generate(input_ids=ids, attention_mask=mask, **kwargs), want)


def test_beam_search_runs_compressed_and_moves_whole_segments():
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([150])
    out = lukv(model, compression=0.8).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=2,
                                                do_sample=False, return_dict_in_generate=True)
    layer = out.cache.layers[0]
    assert layer.store.batch == 2 and (layer.store.length < 150).all()
    assert all(torch.equal(p, p.sort().values) for row in layer.kept_positions() for p in row)


def test_storage_grows_past_any_capacity_without_recompiling():
    model = tiny_model("qwen3", layers=2)
    ids, mask = left_padded_batch([40, 12])
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=150, do_sample=False, min_new_tokens=150)
    out = lukv(model, compression=0.0).generate(input_ids=ids, attention_mask=mask, max_new_tokens=150,
                                                min_new_tokens=150, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    store = out.cache.layers[0].store
    assert (store.length == np.array([[189, 189], [161, 161]])).all() and (store.cap >= store.length).all()
    assert counters["lukv"]["graphs_compiled"] == 2


def lengths_after(compiled, cache, chunks):
    held = []
    with torch.no_grad():
        for chunk in chunks:
            compiled(input_ids=torch.randint(1, 128, (1, chunk)), cache=cache)
            layer = cache.layers[0]
            held.append((layer.store.length[0].copy(), layer.budget(layer.real_tokens)[0]))
    return held


def test_evict_on_every_turn_keeps_the_budget_after_each_chunk():
    model = tiny_model("llama", layers=2)
    cache = LUKVCache(model.config, compression=0.75, sink=2, window=4, evict="turn")
    for length, budget in lengths_after(lukv(model), cache, [100, 60, 1, 1, 80]):
        assert (length <= budget + 2).all()  # two single-token steps since the last multi-token chunk
    # the bytes held follow the budget too: a quarter of 243 tokens plus at most the room per head
    assert cache.nbytes() < 0.25 * 243 * 2 * 2 * 2 * 16 * 4 * 1.5


def test_evict_always_bounds_decode_growth_and_prompt_only_keeps_later_tokens():
    model = tiny_model("llama", layers=2)
    always = lengths_after(lukv(model), LUKVCache(model.config, compression=0.75, sink=2, window=4, evict="always"),
                           [100] + [1] * 90)
    assert all((length <= budget + DECODE_SLACK).all() for length, budget in always)
    assert always[-1][0].max() < 25 + 90  # it did evict while decoding
    prompt_only = lengths_after(lukv(model), LUKVCache(model.config, compression=0.75, sink=2, window=4),
                                [100, 30, 1])
    assert (prompt_only[-1][0] == 25 + 31).all()


def test_assisted_decoding_is_refused_before_work():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([20])
    with pytest.raises(ValueError, match="prompt-lookup decoding"):
        lukv(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="use_cache=False"):
        lukv(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, use_cache=False)
    assert counters["lukv"]["graphs_compiled"] == 0


def test_errors_do_not_poison_later_calls():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([30, 20])
    compiled = lukv(model, compression=0.5)
    with pytest.raises(ValueError, match="got a DynamicCache"):
        compiled.generate(input_ids=ids, attention_mask=mask, cache=DynamicCache(config=model.config),
                          max_new_tokens=2)
    custom = torch.ones(2, 1, 30, 30, dtype=torch.bool)  # bidirectional: not what the cache can serve
    with torch.no_grad(), pytest.raises(LUKVCacheError, match="not causal"):
        compiled(input_ids=ids, attention_mask=custom, cache=LUKVCache(model.config, compression=0.5))
    cache = LUKVCache(model.config, compression=0.5)
    compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=3)
    with torch.no_grad(), pytest.raises(LUKVCacheError, match="call cache.reset"):
        compiled(input_ids=ids[:1], cache=cache)
    fresh = tiny_model("llama")  # a new instance of the same class compiles and runs
    out = lukv(fresh, compression=0.5).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                return_dict_in_generate=True)
    assert isinstance(out.cache, LUKVCache) and out.cache.get_seq_length() == 32


def test_a_compiled_function_keeps_true_mask_offsets():
    # A function's arguments are not known by name, so its inputs are not cut to the chunk: the masks must
    # then sit at the history's true offsets (a chunk-relative mask over the whole history would be misread).
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([30, 20])
    more = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    history = torch.cat([mask, torch.ones_like(more)], dim=1)
    step = torch.compile(lambda i, m, c: model(input_ids=i, attention_mask=m, cache=c).logits, backend="lukv",
                         options={"inner": "aot_eager", "compression": 0.0})
    cache, want = LUKVCache(model.config, compression=0.0), DynamicCache(config=model.config)
    with torch.no_grad():
        for chunk, chunk_mask in ((ids, mask), (more, history)):
            torch.testing.assert_close(step(chunk, chunk_mask, cache),
                                       model(input_ids=chunk, attention_mask=chunk_mask, cache=want).logits,
                                       rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 35


def test_eager_attention_and_uncompiled_models_get_clear_errors():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids, mask = left_padded_batch([20])
    with pytest.raises(ValueError, match="attention implementation is 'eager'"):
        lukv(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="not compiled with the lukv backend"):
        plain.generate(input_ids=ids, attention_mask=mask, cache=LUKVCache(plain.config), max_new_tokens=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="used outside the lukv backend"):
        plain(input_ids=ids, cache=LUKVCache(plain.config))


def test_conflicting_settings_are_refused():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([20])
    with pytest.raises(ValueError, match="compression=0.5 in the compile options but 0.8 in the cache"):
        lukv(model, compression=0.5).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                              cache=LUKVCache(model.config, compression=0.8))


def test_generate_with_cache_keyword_warns_nothing(caplog):
    model = tiny_model("llama")
    ids, mask = left_padded_batch([20])
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = lukv(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                   cache=LUKVCache(model.config), return_dict_in_generate=True)
        assert isinstance(out.cache, LUKVCache)
    assert "deprecated" not in caplog.text


def test_profile_for_another_model_is_refused_unless_allowed():
    model = tiny_model("llama", layers=2, kv_heads=2)
    other = tiny_model("llama", layers=2, kv_heads=2, vocab=256)  # same shape, another model
    profile = Profile.uniform(2, 2)
    profile.fingerprint = config_fingerprint(other.config)
    with pytest.raises(ProfileError, match="fingerprint.*allow_other_model=True"):
        LUKVCache(model.config, profile=profile)
    assert LUKVCache(model.config, profile=profile, allow_other_model=True).profile is profile
    with pytest.raises(ProfileError, match="profile is for 3 layers x 2 KV heads"):
        LUKVCache(model.config, profile=Profile.uniform(3, 2))
    with pytest.raises(ValueError, match="scorer='keydiff' but the profile was made with 'snapkv'"):
        LUKVCache(model.config, profile=Profile.uniform(2, 2, scorer="snapkv"), scorer="keydiff")


def test_profile_with_missing_metadata_names_the_field(tmp_path):
    import json

    from safetensors.torch import save_file

    meta = Profile.uniform(2, 2).metadata()
    del meta["num_kv_heads"]
    path = tmp_path / "bad.safetensors"
    save_file({"prune_fractions": torch.zeros(99, 2, 2)}, str(path), metadata={"lukv": json.dumps(meta)})
    with pytest.raises(ProfileError, match="metadata lacks num_kv_heads"):
        Profile.load(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=2.5), "window=2.5 is not allowed"),
    (dict(sink=True), "sink=True is not allowed"),
    (dict(compression="0.8"), "compression='0.8' is not allowed"),
    (dict(evict="never"), "evict='never' is not allowed"),
])
def test_bad_cache_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LUKVCache(tiny_model("llama").config, **kwargs)


def test_reset_reuses_the_cache():
    model = tiny_model("llama")
    ids, mask = left_padded_batch([40, 31])
    cache = LUKVCache(model.config, compression=0.5)
    compiled = lukv(model)
    first = compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False)
    assert cache.get_seq_length() == 40 + 4  # padded prompt + the decode steps (the last token is not fed back)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    again = compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(first, again)
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)


def test_chunked_prefill_in_generate_equals_eager_at_full_budget():
    model = tiny_model("llama", layers=2)
    ids, mask = left_padded_batch([200, 150])
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = lukv(model, compression=0.0, prefill_chunk=64).generate(input_ids=ids, attention_mask=mask, **kwargs)
    # logits, not only tokens: the padded row's chunks must get generate()'s positions (real tokens before each)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(got.sequences, want.sequences)


def test_chunked_prefill_holds_at_most_budget_plus_chunk(monkeypatch):
    from lukv_compile.runtime import layer as layer_module
    from lukv_compile.runtime.chunked_prefill import chunked_prefill

    peaks = []

    def watched_evict(store, candidates, **step):
        peaks.append((store.length.max(), step["budget"].max()))  # held just before this eviction
        return evict(store, candidates, **step)

    evict = layer_module.evict
    monkeypatch.setattr(layer_module, "evict", watched_evict)
    model = tiny_model("llama", layers=2)
    cache = LUKVCache(model.config, compression=0.8, sink=2, window=4)
    ids = torch.randint(1, 128, (1, 700), generator=torch.Generator().manual_seed(0))
    chunked_prefill(lukv(model), cache, ids, chunk=100)
    assert len(peaks) == 2 * 7  # every chunk of every layer evicted
    budgets = [0] + [b for _, b in peaks[::2]]
    for (held, _), budget_before in zip(peaks[::2], budgets, strict=False):
        assert held <= budget_before + 100  # the kept tokens so far plus one chunk, never the whole prompt
    assert cache.layers[0].store.length.max() == 700 // 5
