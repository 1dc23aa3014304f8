"""Context compression ranked by reconstruction: the cache keeps exactly what the evaluation simulates."""

import numpy as np
import pytest
import torch
from test_eval import CharTokenizer, lukv_compiled, tiny_profile
from tiny_models import tiny_model

from lukv_compile import LUKVCache, LUKVCacheError, Profile, log
from lukv_compile.eval import methods
from lukv_compile.eval.harness import Prompt, evaluate, run_sample
from lukv_compile.policy.budgets import keep_counts
from lukv_compile.profiling.oracle import record_prefill
from lukv_compile.profiling.reconstruction import POOL, context_utility, reconstruction_utility, repeat_ids
from lukv_compile.runtime.compress_context import compress_context

RECONSTRUCTED = ["uniform:reconstruction", "adakv:reconstruction", "lukv-keydiff:reconstruction", "lukv:reconstruction",
                 "global:reconstruction", "uniform:kvzip", "lukv-reconstruction:kvzip", "global:kvzip",
                 "globalfloor:kvzip", "global:kvzip_pooled"]


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128, seed=3)
    m.config.name_or_path = "test/Tiny-Llama:random"
    return m


def context(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_simulated_engine_gives_the_compiled_engines_answers(model, tmp_path, monkeypatch):
    """`compress_context` + the compiled model answers as the simulated engine's rows do, for both scorings
    (reconstruction, kvzip) on per-head budgets and under KVzip's global selection."""
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "keydiff")
    tiny_profile(tmp_path, "reconstruction")
    args = dict(methods=["full", "uniform:keydiff", *RECONSTRUCTED], tasks=["passkey"], context_tokens=[300],
                samples=2, compressions=[0.5, 0.8], progress=False, prompt_format="plain")
    simulated = evaluate(model, CharTokenizer(), engine="simulated", **args)
    compiled = evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), **args)
    key = lambda r: (r.sample, r.method, r.compression)  # noqa: E731
    assert len(simulated) == len(compiled) == 2 * (1 + 2 * (1 + len(RECONSTRUCTED)))
    assert {key(r): r.answer for r in simulated} == {key(r): r.answer for r in compiled}
    answers = {key(r): r.answer for r in simulated}
    for other in ("uniform:keydiff", "uniform:kvzip", "global:reconstruction", "global:kvzip_pooled"):
        assert any(answers[s, "uniform:reconstruction", c] != answers[s, other, c]
                   for s in (0, 1) for c in (0.5, 0.8)), f"the scoring and selection should matter ({other})"
    assert all(r.kv_ratio < 0.8 for r in compiled if r.method in RECONSTRUCTED and r.compression == 0.5)


def test_the_cache_keeps_each_heads_budget_of_top_reconstruction_tokens(model):
    ids = context()
    reconstruction = (torch.arange(10) + 3).tolist() + ids[0].tolist()
    cache = LUKVCache(model.config, compression=0.7, scorer="keydiff")
    compress_context(model, cache, ids, reconstruction, scoring="reconstruction", selection="budgets")
    utility = reconstruction_utility(model, record_prefill(model, ids), reconstruction)
    assert cache.get_seq_length() == 200
    for layer in cache.layers:
        budget = layer.budget(np.array([200]))[0]
        for h, kept in enumerate(layer.kept_positions()[0]):
            kept = set(kept.tolist())
            assert len(kept) == budget[h]
            assert {0, 1, 2, 3, 199} <= kept  # sink 4 and the last token are protected
            scores = utility[layer.layer_idx, h]
            chosen = [j for j in range(4, 199) if j in kept]
            dropped = [j for j in range(4, 199) if j not in kept]
            assert min(scores[chosen]) >= max(scores[dropped])
    assert cache.nbytes() < 0.5 * 2 * 2 * 2 * 200 * 16 * 4  # layers x K/V x heads x tokens x dim x fp32


def test_global_selection_keeps_the_budgets_total_above_one_threshold_over_every_head(model):
    """KVzip's selection: as many tokens in all as the per-head budgets, each head's protected ones, and the rest
    by one threshold on KVzip's score across every head of every layer (so the heads' counts differ)."""
    ids = context(seed=5)
    reconstruction = (torch.arange(10) + 3).tolist() + ids[0].tolist()
    cache = LUKVCache(model.config, compression=0.7, scorer="keydiff")
    compress_context(model, cache, ids, reconstruction, scoring="kvzip", selection="global")
    scores = context_utility(model, record_prefill(model, ids), reconstruction, "kvzip")
    budgets = np.stack([layer.budget(np.array([200]))[0] for layer in cache.layers])
    kept = [[set(p.tolist()) for p in layer.kept_positions()[0]] for layer in cache.layers]
    counts = np.array([[len(k) for k in heads] for heads in kept])
    assert counts.sum() == budgets.sum() and len(set(counts.flatten().tolist())) > 1
    chosen, dropped = [], []
    for (i, h), _ in np.ndenumerate(counts):
        assert {0, 1, 2, 3, 199} <= kept[i][h]
        chosen += [scores[i, h, j] for j in range(4, 199) if j in kept[i][h]]
        dropped += [scores[i, h, j] for j in range(4, 199) if j not in kept[i][h]]
    assert min(chosen) >= max(dropped)
    default = LUKVCache(model.config, compression=0.7, scorer="keydiff")
    compress_context(model, default, ids, reconstruction)  # the default is KVzip's scoring and selection
    assert all(torch.equal(a, b) for x, y in zip(cache.layers, default.layers, strict=True)
               for a, b in zip(x.kept_positions()[0], y.kept_positions()[0], strict=True))


def test_the_ranking_is_each_tokens_best_utility_over_its_neighbours(model):
    """Pooled: a token scores the largest unpooled utility within POOL // 2 tokens either side (edges clipped)."""
    ids = context(60, seed=4)
    record = record_prefill(model, ids)
    pooled = reconstruction_utility(model, record, ids[0].tolist())
    raw = reconstruction_utility(model, record, ids[0].tolist(), pool=1)
    assert POOL == 7 and pooled.shape == raw.shape == (2, 2, 60)
    for t in range(60):
        window = raw[..., max(0, t - POOL // 2):t + POOL // 2 + 1]
        torch.testing.assert_close(pooled[..., t], window.amax(dim=-1), rtol=0, atol=0)
    assert not torch.equal(pooled, raw)
    for bad in (0, 4):  # an even width has no centre: it would shift the scores by one token
        with pytest.raises(ValueError, match=f"odd integer >= 1.*got {bad}"):
            reconstruction_utility(model, record, ids[0].tolist(), pool=bad)


def test_kvzip_pooled_is_kvzips_score_pooled_as_ours(model):
    """kvzip_pooled: each token's KVzip score (attention weight alone) maxed over POOL neighbours; kvzip unpooled."""
    ids = context(60, seed=5)
    record = record_prefill(model, ids)
    kvzip = context_utility(model, record, ids[0].tolist(), "kvzip")
    torch.testing.assert_close(kvzip, reconstruction_utility(model, record, ids[0].tolist(), pool=1,
                                                             attention_only=True), rtol=0, atol=0)
    pooled = context_utility(model, record, ids[0].tolist(), "kvzip_pooled")
    for t in range(60):
        window = kvzip[..., max(0, t - POOL // 2):t + POOL // 2 + 1]
        torch.testing.assert_close(pooled[..., t], window.amax(dim=-1), rtol=0, atol=0)
    assert not torch.equal(pooled, kvzip)


def test_the_compressed_cache_continues_on_the_compiled_model(model):
    """A later turn after compress_context: the compiled model appends to the kept tokens at the right positions."""
    cache = LUKVCache(model.config, compression=0.5, scorer="keydiff")
    ids = context(seed=1)
    logits = compress_context(model, cache, ids, ids[0].tolist())
    kept = [[len(p) for p in layer.kept_positions()[0]] for layer in cache.layers]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)  # the context itself is exact
    compiled = lukv_compiled(model)
    out = compiled.generate(input_ids=torch.cat([ids, context(5, seed=2)], dim=1), cache=cache,
                            max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == 209 and cache.get_seq_length() == 208
    assert [[len(p) - 8 for p in layer.kept_positions()[0]] for layer in cache.layers] == kept


def test_a_cache_filled_whole_answers_every_turn_as_the_full_cache(model):
    """compress_context at compression 0 keeps every token: the question and two later turns on the compiled
    model then answer token for token as on the full cache (the path the multi-question protocol measures)."""
    prompt = Prompt(context(seed=4), [5, 6, 7], 6, [], ([8, 9, 10, 11], [12, 13]))
    compiled = lukv_compiled(model)
    full = run_sample(compiled, model, methods.make_cache("full", model, 0.0), prompt, set())
    cache = LUKVCache(model.config, compression=0.0, scorer="keydiff")
    got = run_sample(compiled, model, cache, prompt, set(),
                     fill=lambda ids: compress_context(model, cache, ids, ids[0].tolist()))
    assert [len(p) for layer in cache.layers for p in layer.kept_positions()[0]] == [cache.get_seq_length()] * 4
    assert [got.tokens, *got.later] == [full.tokens, *full.later]


def test_bad_calls_raise_before_work(model):
    ids = context()
    cache = LUKVCache(model.config, compression=0.5, scorer="keydiff")
    with pytest.raises(ValueError, match="plain model"):
        compress_context(lukv_compiled(model), cache, ids, [5])
    with pytest.raises(ValueError, match="one sequence"):
        compress_context(model, cache, ids.expand(2, -1), [5])
    with pytest.raises(ValueError, match="leaves nothing to evict"):
        compress_context(model, cache, ids[:, :5], [5])
    with pytest.raises(TypeError, match="LUKVCache"):
        compress_context(model, object(), ids, [5])
    with pytest.raises(ValueError, match="empty"):
        compress_context(model, cache, ids, [])
    with pytest.raises(ValueError, match="unknown context scoring 'h2o'; allowed: reconstruction, kvzip, kvzip_pooled"):
        compress_context(model, cache, ids, [5], scoring="h2o")
    with pytest.raises(ValueError, match="unknown selection 'layer'; allowed: global, floored_global, budgets"):
        compress_context(model, cache, ids, [5], selection="layer")
    adakv = LUKVCache(model.config, compression=0.5, scorer="keydiff", policy="adakv")
    with pytest.raises(ValueError, match="AdaKV's policy splits each layer's"):
        compress_context(model, adakv, ids, [5], selection="global")
    compress_context(model, cache, ids, [5])
    with pytest.raises(ValueError, match="empty LUKVCache"):
        compress_context(model, cache, ids, [5])


def test_reconstruction_needs_the_agnostic_protocol(model):
    with pytest.raises(ValueError, match="agnostic only"):
        evaluate(model, CharTokenizer(), methods=["uniform:reconstruction"], tasks=["passkey"], context_tokens=[300],
                 samples=1, compressions=[0.8], progress=False, prompt_format="plain", protocols=("aware",))


def test_repeat_ids_are_the_request_then_the_context():
    tokenizer = CharTokenizer()
    ids = repeat_ids(tokenizer, "abc", chat=False)
    assert tokenizer.decode(ids) == "\n\nRepeat the text above exactly.abc"


def reconstruction_profile() -> Profile:
    """A profile made for the reconstruction ranking: head (0, 0) keeps more than the others."""
    prune = Profile.uniform(2, 2).prune.copy()
    prune[:, 0, 0] = prune[:, 0, 1] / 2
    return Profile(prune, scorer="reconstruction", window=1)


def test_a_reconstruction_profile_is_applied_by_compress_context_only(model):
    """Its budgets fill the cache through compress_context; a forward on the empty cache is refused, not guessed."""
    profile = reconstruction_profile()
    compiled = lukv_compiled(model)
    ids = context(seed=4)
    cache = LUKVCache(model.config, profile=profile, compression=0.5, allow_other_model=True)
    with pytest.raises(ValueError, match="compress_context"):
        compiled.generate(input_ids=ids, cache=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(LUKVCacheError, match="compress_context"), torch.no_grad():
        compiled(input_ids=ids, cache=cache)
    assert cache.get_seq_length() == 0 and all(layer.store is None for layer in cache.layers)
    for bad in ({"evict": "turn"}, {"evict": "always"}, {"prefill_chunk": 64}):
        with pytest.raises(ValueError, match="compress_context"):
            LUKVCache(model.config, profile=profile, compression=0.5, allow_other_model=True, **bad)

    compress_context(model, cache, ids, ids[0].tolist(), selection="budgets")  # the profile's own budgets
    budget = keep_counts(profile, 0.5, [200], protected=5)[0]
    assert budget[0, 0] > budget[0, 1]
    assert [[len(p) for p in layer.kept_positions()[0]] for layer in cache.layers] == budget.tolist()
    out = compiled.generate(input_ids=torch.cat([ids, context(5, seed=2)], dim=1), cache=cache, max_new_tokens=3,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == 208 and cache.get_seq_length() == 207


def test_reconstruction_budgets_with_another_ranking_run_on_the_simulated_engine_only(model, tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    tiny_profile(tmp_path, "reconstruction")
    args = dict(methods=["full", "lukv-reconstruction:keydiff"], tasks=["passkey"], context_tokens=[300], samples=1,
                compressions=[0.8], progress=False, prompt_format="plain")
    simulated = evaluate(model, CharTokenizer(), engine="simulated", **args)
    assert [r.method for r in simulated] == ["full", "lukv-reconstruction:keydiff"]
    compiled = evaluate(model, CharTokenizer(), engine="compiled", compiled=lukv_compiled(model), **args)
    assert [r.method for r in compiled] == ["full"]
    assert "skipped lukv-reconstruction:keydiff: a cache holding a reconstruction profile" in capsys.readouterr().out


def test_the_default_global_selection_says_once_that_a_profiles_budgets_went_unused(model, caplog, monkeypatch):
    monkeypatch.setattr(log, "_reported", set())
    ids = context(seed=6)
    for _ in range(2):
        cache = LUKVCache(model.config, profile=reconstruction_profile(), compression=0.5, allow_other_model=True)
        compress_context(model, cache, ids, ids[0].tolist())
    said = [r.getMessage() for r in caplog.records if "one threshold over every head" in r.getMessage()]
    assert len(said) == 1 and "reconstruction profile gave only the total" in said[0]
    assert "selection='budgets'" in said[0]


def test_lukv_compress_uses_the_shipped_budgets_only_for_per_head_selection(model, tmp_path, monkeypatch, caplog):
    """`lukv compress`'s default (global) takes uniform budgets (only the total counts) and says nothing; per-head
    selection takes the model's reconstruction profile."""
    from lukv_compile.tools.compress_command import compress_document, reconstruction_profile

    monkeypatch.setattr(methods, "PROFILE_DIR", tmp_path)
    monkeypatch.setattr(log, "_reported", set())
    tiny_profile(tmp_path, "reconstruction")
    assert reconstruction_profile(model, "budgets").scope != "uniform"
    assert reconstruction_profile(model, "global").scope == "uniform"
    text = "".join(chr(3 + i % 100) for i in range(200))
    cache, _ = compress_document(model, CharTokenizer(), text, 0.5)
    assert cache.profile.scope == "uniform" and cache.profile.scorer == "reconstruction"
    assert not [r for r in caplog.records if "one threshold over every head" in r.getMessage()]
