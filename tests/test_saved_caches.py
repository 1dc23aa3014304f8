"""Compress once, ask many: caches saved and loaded, forked with shared storage, many questions in one batch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cache import PROPERTY
from tiny_models import FAMILIES, assert_same_generation, left_padded_batch, tiny_gemma3, tiny_model

from lukv_compile import LUKVCache, LUKVCacheError, nbytes_together, questions_batch
from lukv_compile.kernels.reference import segment_attention
from lukv_compile.runtime.storage import RaggedStore

POLICY = dict(compression=0.6, sink=2, window=4)


def lukv(model, inner="aot_eager"):
    return torch.compile(model, backend="lukv", options={"inner": inner})


def generate(compiled, cache, ids, mask, steps=5):
    out = compiled.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def said(ids, mask, tokens, seed):
    """The conversation `ids` with `tokens` new user tokens after it, and its mask."""
    new = torch.randint(1, 128, (ids.shape[0], tokens), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([ids, new], dim=1)
    return ids, torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)


def filled(compiled, model, lengths, history, **policy):
    """A compressed cache after a prompt of `lengths` (left-padded) and `history`: 'prompt' (one forward),
    'chunked' (prefill in 16-token chunks) or 'two turns'; with the conversation so far and its mask."""
    cache = LUKVCache(model.config, **POLICY, **policy, **({"prefill_chunk": 16} if history == "chunked" else {}))
    ids, mask = left_padded_batch(lengths)
    ids, _ = generate(compiled, cache, ids, mask, steps=3)
    mask = torch.cat([mask, torch.ones(ids.shape[0], 3, dtype=mask.dtype)], dim=1)
    if history == "two turns":
        ids, mask = said(ids, mask, 7, seed=1)
        ids, _ = generate(compiled, cache, ids, mask, steps=3)
        mask = torch.cat([mask, torch.ones(ids.shape[0], 3, dtype=mask.dtype)], dim=1)
    return cache, ids, mask


MODELS = {family: (lambda family=family: tiny_model(family, layers=2, seed=3)) for family in FAMILIES}
MODELS["gemma3"] = tiny_gemma3  # sliding-window layers are saved whole (their window)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_save_load_continue_equals_continuing_the_original(family, tmp_path):
    model = MODELS[family]()
    compiled = lukv(model)
    for lengths in ([70], [70, 52]):
        for history in ("prompt", "chunked", "two turns"):
            if family == "gemma3" and history == "chunked":
                continue  # prefill_chunk needs every layer compressible
            cache, ids, mask = filled(compiled, model, lengths, history)
            path = tmp_path / f"{len(lengths)}-{history}.lukv"
            cache.save(path, token_ids=ids)
            loaded = LUKVCache.load(path, model)
            assert torch.equal(loaded.token_ids, ids) and loaded.get_seq_length() == cache.get_seq_length()
            assert [p.tolist() for p in loaded.layers[1].kept_positions()[0]] == \
                [p.tolist() for p in cache.layers[1].kept_positions()[0]]
            question, question_mask = said(loaded.token_ids, mask, 6, seed=2)
            got = generate(compiled, loaded, question, question_mask)
            assert_same_generation(got, generate(compiled, cache, question, question_mask))


def test_the_file_is_the_compressed_size(tmp_path):
    model = tiny_model("llama", layers=2)
    compiled = lukv(model)
    cache = LUKVCache(model.config, compression=0.8, sink=2, window=8)
    ids = torch.randint(1, 128, (1, 400))
    with torch.no_grad():
        compiled(ids, cache=cache)
    cache.save(tmp_path / "doc.lukv", token_ids=ids)
    size = (tmp_path / "doc.lukv").stat().st_size
    kv = sum(layer.store.held.sum() for layer in cache.layers) * 2 * 16 * 4  # K and V, head_dim 16, fp32
    full = 2 * 2 * 400 * 2 * 16 * 4  # layers x KV heads x tokens x (K, V) x head_dim x fp32
    # the kept K/V, their positions, the token ids and the profile's prune table (99 x 2 x 2 float32)
    assert kv < size < kv * 1.3 + 400 * 8 + 99 * 4 * 4 + 4096
    assert size < 0.3 * full


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed cache of a 2-layer llama, saved, and its model."""
    model = tiny_model("llama", layers=2, seed=5)
    cache = LUKVCache(model.config, **POLICY)
    ids = torch.randint(1, 128, (1, 60))
    with torch.no_grad():
        lukv(model)(ids, cache=cache)
    path = tmp_path_factory.mktemp("saved") / "doc.lukv"
    cache.save(path, token_ids=ids)
    return model, path


def test_corrupt_and_truncated_files_are_refused(saved, tmp_path):
    model, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a byte of the last tensor's data
    (tmp_path / "corrupt.lukv").write_bytes(bytes(data))
    with pytest.raises(LUKVCacheError, match="checksum.*corrupt"):
        LUKVCache.load(tmp_path / "corrupt.lukv", model)
    (tmp_path / "short.lukv").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LUKVCacheError, match="corrupt or truncated"):
        LUKVCache.load(tmp_path / "short.lukv", model)
    with pytest.raises(LUKVCacheError, match="no such cache file"):
        LUKVCache.load(tmp_path / "missing.lukv", model)
    from lukv_compile import Profile

    Profile.uniform(2, 2).save(tmp_path / "profile.safetensors")
    with pytest.raises(LUKVCacheError, match="not a lukv cache file"):
        LUKVCache.load(tmp_path / "profile.safetensors", model)


def test_a_cache_from_another_model_is_refused_unless_allowed(saved):
    model, path = saved
    retrained = tiny_model("llama", layers=2, seed=6)  # the same config, other weights
    with pytest.raises(LUKVCacheError, match="weights differ"):
        LUKVCache.load(path, retrained)
    loaded = LUKVCache.load(path, retrained.config)  # a config alone: the weights are checked at the first forward
    with pytest.raises(LUKVCacheError, match="weights differ"), torch.no_grad():
        lukv(retrained)(torch.randint(1, 128, (1, 3)), cache=loaded)
    assert loaded.get_seq_length() == 60  # refused before any change
    with pytest.raises(LUKVCacheError, match="config fingerprint"):
        LUKVCache.load(path, tiny_model("llama", layers=2, vocab=256))
    with pytest.raises(LUKVCacheError, match="KV shape"):
        LUKVCache.load(path, tiny_model("llama", layers=3))
    assert LUKVCache.load(path, retrained, allow_other_model=True).get_seq_length() == 60


def test_save_needs_a_served_cache_and_its_tokens():
    model = tiny_model("llama", layers=2)
    with pytest.raises(LUKVCacheError, match="served no model"):
        LUKVCache(model.config).save("never.lukv")
    cache = LUKVCache(model.config)
    with torch.no_grad():
        lukv(model)(torch.randint(1, 128, (1, 20)), cache=cache)
    with pytest.raises(ValueError, match=r"token_ids must be the \[batch=1, >= 20\]"):
        cache.save("short.lukv", token_ids=torch.zeros(1, 19, dtype=torch.long))


def ask(compiled, cache, document, question, steps=6):
    return generate(compiled, cache, torch.cat([document, question])[None], None, steps)


@pytest.mark.parametrize("evict", ["prompt", "turn"])
def test_forks_equal_separate_runs_and_share_the_document(evict):
    model = tiny_model("llama", layers=2, seed=4)
    compiled = lukv(model)
    document = torch.randint(1, 128, (90,))
    questions = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 12, 8)]
    separate = []
    for question in questions:
        cache = LUKVCache(model.config, **POLICY, evict=evict)
        with torch.no_grad():
            compiled(document[None], cache=cache)
        separate.append((ask(compiled, cache, document, question), cache.nbytes()))
    shared = LUKVCache(model.config, **POLICY, evict=evict)
    with torch.no_grad():
        compiled(document[None], cache=shared)
    document_bytes = shared.nbytes()
    forks = [shared.fork() for _ in questions]
    for fork, question, (want, _) in zip(forks, questions, separate, strict=True):
        assert_same_generation(ask(compiled, fork, document, question), want)
    together = nbytes_together(forks)
    if evict == "prompt":  # the questions only append: one document, three suffixes
        prefix = [layer.store.prefix for fork in forks for layer in fork.layers]
        assert all(p is not None for p in prefix)
        assert forks[0].layers[0].store.prefix.keys is forks[2].layers[0].store.prefix.keys
        suffixes = sum(fork.nbytes() - document_bytes for fork in forks)
        assert together < document_bytes + suffixes + 4096 < sum(nbytes for _, nbytes in separate)
    else:  # each question's turn evicts: every fork took its own copy of what it keeps
        assert all(layer.store.prefix is None for fork in forks for layer in fork.layers)


# Sliding-window layers count the padding between the document and a shorter question inside their window
# (transformers' semantics, which lukv keeps exactly), so there only questions of one length equal asking alone.
@pytest.mark.parametrize("family, lengths", [("llama", (4, 11, 7, 1)), ("gemma3", (6, 6, 6))])
def test_a_batch_of_questions_equals_asking_them_one_by_one(family, lengths):
    model = MODELS[family]()
    compiled = lukv(model)
    document = torch.randint(1, 128, (80,), generator=torch.Generator().manual_seed(9))
    questions = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    cache = LUKVCache(model.config, **POLICY)
    with torch.no_grad():
        compiled(document[None], cache=cache)
    batch = cache.fork(len(questions))
    inputs = questions_batch(document, questions, pad_token_id=0)
    sequences, logits = generate(compiled, batch, inputs["input_ids"], inputs["attention_mask"], steps=6)
    for row, question in enumerate(questions):
        one = ask(compiled, cache.fork(), document, question)
        torch.testing.assert_close(logits[row], one[1][0], rtol=1e-4, atol=1e-4)
        assert torch.equal(sequences[row, -6:], one[0][0, -6:])


def test_fork_and_questions_batch_check_their_arguments():
    model = tiny_model("llama", layers=2)
    cache = LUKVCache(model.config)
    with torch.no_grad():
        lukv(model)(torch.randint(1, 128, (2, 20)), cache=cache)
    with pytest.raises(ValueError, match="holds 2"):
        cache.fork(3)
    with pytest.raises(ValueError, match="fork batch must be"):
        cache.fork(0)
    assert cache.fork().batch_size == 2
    with pytest.raises(ValueError, match="at least one token"):
        questions_batch([1, 2], [[3], []], 0)
    with pytest.raises(ValueError, match="one non-empty sequence"):
        questions_batch(torch.ones(2, 3, dtype=torch.long), [[3]], 0)
    inputs = questions_batch([5, 6], [[1, 2, 3], [4]], pad_token_id=0)
    assert inputs["input_ids"].tolist() == [[5, 6, 1, 2, 3], [5, 6, 0, 0, 4]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1]]


@settings(max_examples=30, **PROPERTY)
@given(lengths=st.tuples(st.integers(0, 40), st.integers(1, 40)), rows=st.integers(1, 3),
       chunks=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_attention_over_a_shared_prefix_equals_the_unshared_store(lengths, rows, chunks, seed):
    """The CPU kernel's two-part attention (prefix, then own tokens; causal, left padding) against one segment."""
    gen = torch.Generator().manual_seed(seed)
    store = RaggedStore(1, 2, 8, torch.float32, torch.device("cpu"))
    t = max(max(lengths), 1)
    store.append(*torch.randn(2, 1, 2, t, 8, generator=gen), np.array([t]), 0)
    keys, values, positions, _ = store.dense()
    selected = torch.arange(t)[None, None, :] >= t - torch.tensor(lengths)[None, :, None]
    store.replace(selected, keys, values, positions)
    fork = store.fork_rows(np.zeros(rows, dtype=np.int64))
    for chunk in chunks:
        counts = torch.randint(1, chunk + 1, (rows,), generator=gen).numpy()  # left padding in each row
        k, v = torch.randn(2, rows, 2, chunk, 8, generator=gen)
        fork.append(k, v, counts, 100)
        q = torch.randn(rows, 4, chunk, 8, generator=gen)
        shared = fork.shared()
        got = segment_attention(q, fork.keys, fork.values, fork.start, fork.length, counts, 0.3,
                                (shared.keys, shared.values, shared.start, shared.length))
        whole = fork.packed()  # the same tokens, one segment per head, no prefix
        want = segment_attention(q, whole.keys, whole.values, whole.start, whole.length, counts, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(store.held, np.array([lengths]))  # the original is untouched by its fork's appends


@pytest.mark.slow
def test_saved_and_forked_caches_continue_exactly_on_the_default_compiler(tmp_path):
    """The default inner (inductor), a 4-layer model: a loaded cache and forks of a compressed document continue
    as the original does, for random documents, questions and compressions (one compiled model throughout)."""
    model = tiny_model("qwen3", layers=4, seed=8)
    compiled = torch.compile(model, backend="lukv")

    @settings(max_examples=5, **PROPERTY)
    @given(document=st.integers(10, 150), questions=st.lists(st.integers(1, 12), min_size=1, max_size=3),
           compression=st.sampled_from([0.0, 0.5, 0.8]), seed=st.integers(0, 999))
    def check(document, questions, compression, seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 128, (document,), generator=gen)
        asked = [torch.randint(1, 128, (n,), generator=gen) for n in questions]
        cache = LUKVCache(model.config, compression=compression, sink=2, window=4)
        with torch.no_grad():
            compiled(ids[None], cache=cache)
        cache.save(tmp_path / "doc.lukv", token_ids=ids[None])
        loaded = LUKVCache.load(tmp_path / "doc.lukv", model)
        for question in asked:
            want = ask(compiled, cache.fork(), ids, question)
            assert_same_generation(ask(compiled, loaded.fork(), ids, question), want)
        inputs = questions_batch(loaded.token_ids, asked, pad_token_id=0)
        sequences, _ = generate(compiled, loaded.fork(len(asked)), inputs["input_ids"], inputs["attention_mask"], 6)
        for row, question in enumerate(asked):
            assert torch.equal(sequences[row, -6:], ask(compiled, cache.fork(), ids, question)[0][0, -6:])

    check()
