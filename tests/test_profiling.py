"""Profiling: value-output weights, oracle importance vs eager attention, loss curves, profile runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_gemma3
from transformers import LlamaConfig, LlamaForCausalLM

from lukv_compile.config import sliding_layers
from lukv_compile.models import eos_token_ids
from lukv_compile.policy.selection import protect_and_mask, select_tokens
from lukv_compile.profile import NUM_RATIOS, Profile, ProfileError
from lukv_compile.profiling import (
    calibration_inputs,
    cum_losses,
    eviction_order,
    head_graph,
    layer_scores,
    min_keep,
    oracle_importance,
    profile_model,
    profile_scorers,
    prune_fractions,
    record_prefill,
)
from lukv_compile.profiling.oracle import value_output_weights
from lukv_compile.profiling.reconstruction import reconstruction_utility, repeat_ids
from lukv_compile.profiling.run import TEMPERATURE, Window, calibration_windows
from lukv_compile.runtime.cache import LUKVCache
from lukv_compile.solver import build_head_graph, unit_attr

REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=128, eos_token_id=1, bos_token_id=None, pad_token_id=None)


def tiny_model(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(tiny_config(), attn_implementation=attn_implementation).eval()


def tiny_tokenizer():
    """Character-level ASCII tokenizer (ids = code points; 0 unknown, 1 EOS) that fits the tiny vocab."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_model(folder: Path) -> Path:
    """A saved transformers folder (random tiny Llama + char tokenizer) that `lukv profile` can load."""
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- value-output weights


def test_value_output_weights_match_direct_loop():
    torch.manual_seed(1)
    h_kv, hq, t, d, hidden = 2, 4, 7, 8, 16
    v = torch.randn(1, h_kv, t, d)
    w = torch.randn(hidden, hq * d)
    expected = torch.zeros(hq, t)
    for h in range(hq):
        w_h = w[:, h * d:(h + 1) * d]  # [hidden, D]
        for j in range(t):
            expected[h, j] = torch.linalg.vector_norm(v[0, h // (hq // h_kv), j] @ w_h.T)
    expected /= expected.sum() + 1e-9
    torch.testing.assert_close(value_output_weights(v, w), expected, rtol=1e-5, atol=1e-7)


def test_recording_sums_weights_to_one_per_layer_and_leaves_outputs_alone(model):
    ids = random_ids(30, 0)
    record = record_prefill(model, ids)
    torch.testing.assert_close(record.value_weights.sum(dim=(1, 2)), torch.ones(2), rtol=1e-5, atol=1e-6)
    assert record.q[0].shape == (1, 4, 30, 16) and record.k[1].shape == (1, 2, 30, 16)
    assert model.config._attn_implementation == "sdpa"  # restored after recording
    with torch.no_grad():
        plain = model(input_ids=ids[None]).logits
        eager = tiny_model("eager")(input_ids=ids[None])
    torch.testing.assert_close(plain, eager.logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- oracle


def test_oracle_matches_eager_attention_reference(model):
    context, question = random_ids(40, 1), random_ids(6, 2)
    record = record_prefill(model, context)
    result = oracle_importance(model, record, question, k_max=5, seed=3)
    steps = result.generated.numel()
    assert steps == 5  # no EOS given: all steps run

    eager = tiny_model("eager")
    full = torch.cat([context, question, result.generated])[None]
    with torch.no_grad():
        out = eager(input_ids=full, output_attentions=True)
    # Decode step i feeds generated token i at position 40 + 6 + i; its attention row is that query row.
    rows = slice(40 + 6, 40 + 6 + steps)
    expected = torch.stack([
        (att[0, :, rows, :40] * record.value_weights[layer][:, None, :])  # [Hq, steps, T_ctx]
        .view(2, 2, steps, 40).amax(dim=(1, 2))
        for layer, att in enumerate(out.attentions)
    ])
    torch.testing.assert_close(result.importance, expected, rtol=1e-4, atol=1e-7)


def test_oracle_is_seeded_and_stops_at_eos(model):
    record = record_prefill(model, random_ids(20, 4))
    a = oracle_importance(model, record, random_ids(3, 5), k_max=6, seed=9)
    b = oracle_importance(model, record, random_ids(3, 5), k_max=6, seed=9)
    assert torch.equal(a.importance, b.importance) and torch.equal(a.generated, b.generated)
    stop = int(a.generated[2])
    c = oracle_importance(model, record, random_ids(3, 5), k_max=6, seed=9, eos_token_ids=(stop,))
    first = int((a.generated == stop).nonzero()[0])
    assert torch.equal(c.generated, a.generated[:first])


def test_oracle_rejects_bad_inputs(model):
    record = record_prefill(model, random_ids(10, 6))
    with pytest.raises(ValueError, match="k_max"):
        oracle_importance(model, record, random_ids(3, 0), k_max=0)
    with pytest.raises(ValueError, match="temperature"):
        oracle_importance(model, record, random_ids(3, 0), temperature=0.0)
    with pytest.raises(ValueError, match="question_ids"):
        oracle_importance(model, record, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="context_ids"):
        record_prefill(model, torch.rand(5))


# ---------------------------------------------------------------- loss curves


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(3, 40), sink=st.integers(0, 4), window=st.integers(0, 6),
       ties=st.booleans())
def test_curves_are_monotone_and_charge_exactly_what_the_runtime_evicts(seed, t, sink, window, ties):
    if t <= sink + window:
        with pytest.raises(ValueError, match="nothing to evict"):
            eviction_order(torch.zeros(1, 1, t), sink, window)
        return
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(2, 3, t, generator=g)
    scores = torch.randint(0, 3, (2, 3, t), generator=g).float() if ties else torch.randn(2, 3, t, generator=g)
    order = eviction_order(scores, sink, window)
    curves = cum_losses(importance, order)
    evictable = t - sink - window
    assert curves.shape == (6, evictable + 1)
    assert np.all(curves[:, 0] == 0) and np.all(np.diff(curves, axis=1) >= 0)
    unprotected = importance.double()[..., sink:t - window].sum(-1).reshape(-1).numpy()
    np.testing.assert_allclose(curves[:, -1], unprotected, rtol=1e-12)
    # Evicting k tokens costs exactly the I of the tokens the runtime selection does not keep.
    ranked = protect_and_mask(scores.reshape(1, 6, t), torch.ones(1, t, dtype=torch.bool), sink, window)
    flat_i = importance.reshape(6, t).double()
    for k in {0, 1, evictable // 2, evictable}:
        kept = select_tokens(ranked, torch.full((1, 6), t - k))[0]
        np.testing.assert_allclose(curves[:, k], (flat_i * ~kept).sum(-1).numpy(), rtol=1e-12, atol=1e-15)


def test_layer_scores_use_the_inference_scorer(model):
    from lukv_compile.policy import scorers

    record = record_prefill(model, random_ids(24, 7))
    got = layer_scores("snapkv", record.q, record.k, record.v, record.scaling)
    valid = torch.ones(1, 2, 24, dtype=torch.bool)
    expected = scorers.score("snapkv", record.q[1], record.k[1], record.v[1], valid, record.scaling[1])[0]
    assert got.shape == (2, 2, 24) and torch.equal(got[1], expected)


# ---------------------------------------------------------------- solving and profiles


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_fractions_meet_each_ratio(scope):
    rng = np.random.default_rng(0)
    layers, heads, t, sink, window = 3, 2, 200, 4, 8
    importance = torch.from_numpy(rng.lognormal(size=(layers, heads, t)))
    curves = cum_losses(importance, eviction_order(torch.from_numpy(rng.normal(size=(layers, heads, t))), sink,
                                                   window))
    prune = prune_fractions(curves, t, sink, window, build_head_graph(layers, heads, 2 * heads), scope)
    assert prune.shape == (NUM_RATIOS, layers, heads)
    assert prune.min() >= 0 and prune.max() <= 1 - min_keep(t, sink, window) / t + 1e-12
    assert np.all(np.diff(prune, axis=0) >= -1e-12)  # nested: more compression never keeps more
    achievable = np.arange(1, NUM_RATIOS + 1) / 100 <= 1 - (sink + window) / t
    means = prune.mean(axis=2) if scope == "layer" else prune.mean(axis=(1, 2))[:, None]
    target = (np.arange(1, NUM_RATIOS + 1) / 100)[:, None]
    np.testing.assert_allclose(means[achievable], np.broadcast_to(target, means.shape)[achievable],
                               atol=1 / (heads * t) + 1e-12)


def test_profile_model_shape_and_metadata(model, tokenizer):
    context = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2
    profile = profile_model(model, tokenizer, "keydiff", sink=2, window=3, k_max=3, context=context,
                            questions=["Who?", "Why?"], progress=False)
    assert isinstance(profile, Profile) and profile.prune.shape == (NUM_RATIOS, 2, 2)
    assert (profile.scorer, profile.sink, profile.window, profile.scope) == ("keydiff", 2, 3, "global")
    assert profile.model["num_kv_heads"] == 2 and len(profile.fingerprint) == 64
    calibration = json.loads(profile.calibration)
    assert calibration["questions"] == 2 and calibration["k_max"] == 3
    assert calibration["context_tokens"] == len(context)  # one token per character


def test_profile_scorers_share_one_oracle_and_average_questions(model, tokenizer):
    kwargs = dict(k_max=2, context="abcdefghij" * 8, progress=False, keep_curves=True)
    both = profile_scorers(model, tokenizer, ["snapkv", "streaming"], questions=["x?", "y?"], **kwargs)
    assert both["snapkv"].curves.shape == (2, 4, 80 - 4 - 32 + 1)
    single = profile_scorers(model, tokenizer, ["streaming"], questions=["x?"], **kwargs)["streaming"]
    per_q = [prune_fractions(c, 80, 4, 32, head_graph(model.config)) for c in both["streaming"].curves]
    np.testing.assert_allclose(both["streaming"].profile.prune, np.mean(per_q, axis=0), atol=1e-6)
    np.testing.assert_array_equal(single.curves[0], both["streaming"].curves[0])


def chat_tokenizer():
    """The char tokenizer with a chat template: '<' + the user's message + '>A:'."""
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    return tok


@pytest.mark.parametrize("prompt_format,pool", [("plain", 7), ("chat", 1)])
def test_reconstruction_profile_charges_the_oracle_in_the_repetitions_order(model, prompt_format, pool):
    """`--scorer reconstruction`: the loss curves rank each head's tokens by their utility to repeating the
    context (pooled as asked); in chat format the context, the question and the repeat request are wrapped
    as the evaluation's."""
    tokenizer, context = chat_tokenizer(), "abcdefghij" * 8
    made = profile_scorers(model, tokenizer, ["reconstruction", "keydiff"], k_max=3, context=context,
                           questions=["x?"], progress=False, keep_curves=True, prompt_format=prompt_format,
                           reconstruction_pool=pool)
    profile = made["reconstruction"].profile
    assert (profile.scorer, profile.sink, profile.window) == ("reconstruction", 4, 1)
    calibration = json.loads(profile.calibration)
    assert "Repeat the text above" in calibration["reconstruction"]
    assert calibration["reconstruction"].endswith("max-pooled over 7 tokens" if pool == 7 else "unpooled")
    chat = prompt_format == "chat"
    assert (calibration["prompt_format"], calibration["prefix_tokens"]) == (prompt_format, int(chat))
    calib = calibration_inputs(tokenizer, context, ["x?"], prompt_format=prompt_format)
    asked = "\n\nx?>A:" if chat else "\n\nQuestion: x?\nAnswer:"
    assert calib.question_ids[0].tolist() == [ord(c) for c in asked]
    assert calib.prefix_ids.tolist() == ([ord("<")] if chat else [])
    record = record_prefill(model, torch.cat([calib.prefix_ids, calib.context_ids]))
    ranking = reconstruction_utility(model, record, repeat_ids(tokenizer, context, chat=chat), pool)
    oracle = oracle_importance(model, record, calib.question_ids[0], 3, TEMPERATURE, 0,
                               eos_token_ids(model, tokenizer)).importance
    np.testing.assert_allclose(made["reconstruction"].curves[0], cum_losses(oracle, eviction_order(ranking, 4, 1)))
    assert made["reconstruction"].curves.shape == (1, 4, 80 + int(chat) - 5 + 1)
    assert not np.allclose(made["reconstruction"].curves[0], made["keydiff"].curves[0]), "the ranking should matter"


WINDOWED_CONTEXT = ("x" * 10 + "The cat sat on the mat." + "y" * 57 + "A dog ran in the park." + "z" * 8)  # 120 chars
WINDOWED_QUESTIONS = ['Which word is missing? "The ____ sat on the mat."', 'Which? "A ____ ran in the park."']


def test_shorter_lengths_ask_each_question_after_the_window_holding_its_passage(tokenizer):
    calib = calibration_inputs(tokenizer, WINDOWED_CONTEXT, WINDOWED_QUESTIONS + ["Who?"])
    assert calib.spans == [(10, 33), (90, 112), None]  # one token per character
    placed = calibration_inputs(tokenizer, WINDOWED_CONTEXT, WINDOWED_QUESTIONS)
    assert calibration_windows(placed, [120, 60, 500]) == [Window(0, 60, (0,)), Window(60, 60, (1,)),
                                                           Window(0, 120, (0, 1))]
    # a passage crossing the grid's window end moves that window back just enough
    assert calibration_windows(placed, [100]) == [Window(0, 100, (0,)), Window(12, 100, (1,))]
    assert calibration_windows(calib, [120]) == [Window(0, 120, (0, 1, 2))]
    with pytest.raises(ValueError, match=r"questions \[2\] do not"):
        calibration_windows(calib, [60])

    class SlowTokenizer:  # no offsets: nothing is placed, one length still works
        is_fast = False

        def __call__(self, text, **kwargs):
            assert not kwargs.get("return_offsets_mapping")
            return tokenizer(text, **kwargs)

    slow = calibration_inputs(SlowTokenizer(), WINDOWED_CONTEXT, WINDOWED_QUESTIONS)
    assert slow.spans == [None, None] and torch.equal(slow.context_ids, placed.context_ids)
    assert calibration_windows(slow, [120]) == [Window(0, 120, (0, 1))]
    with pytest.raises(ValueError, match="gives no offsets"):
        calibration_windows(slow, [60, 120])


def test_several_lengths_average_every_window_and_question(model, tokenizer):
    """context_tokens=[60, 120]: the mean over (window, question) samples of the one-window profiles."""
    kwargs = dict(k_max=2, progress=False)
    both = profile_model(model, tokenizer, "keydiff", context=WINDOWED_CONTEXT, questions=WINDOWED_QUESTIONS,
                         context_tokens=[60, 120], **kwargs)
    first = profile_model(model, tokenizer, "keydiff", context=WINDOWED_CONTEXT[:60], questions=WINDOWED_QUESTIONS[:1],
                          seed=0, **kwargs)
    second = profile_model(model, tokenizer, "keydiff", context=WINDOWED_CONTEXT[60:], questions=WINDOWED_QUESTIONS[1:],
                           seed=1, **kwargs)
    whole = profile_model(model, tokenizer, "keydiff", context=WINDOWED_CONTEXT, questions=WINDOWED_QUESTIONS, **kwargs)
    np.testing.assert_allclose(both.prune, (first.prune + second.prune + 2 * whole.prune) / 4, atol=1e-6)
    calibration = json.loads(both.calibration)
    assert calibration["context_lengths"] == [60, 120] and calibration["windows"] == [[0, 60, 1], [60, 60, 1],
                                                                                      [0, 120, 2]]
    with pytest.raises(ValueError, match="keep_curves needs one context length"):
        profile_scorers(model, tokenizer, ["keydiff"], context=WINDOWED_CONTEXT, questions=WINDOWED_QUESTIONS,
                        context_tokens=[60, 120], keep_curves=True, **kwargs)


def test_sliding_layers_get_no_budget_and_the_runtime_agrees(tokenizer):
    model = tiny_gemma3()  # layers: sliding, full, sliding
    t = 80
    profile = profile_model(model, tokenizer, "snapkv", k_max=3, context="abcdefghij" * 8, questions=["x?"],
                            progress=False)
    assert profile.excluded_layers == tuple(sliding_layers(model.config)) == (0, 2)
    assert not profile.prune[:, [0, 2]].any()
    # The one global layer carries the whole compression: rho of its tokens (up to the protected 36).
    rho = np.arange(1, NUM_RATIOS + 1) / 100
    np.testing.assert_allclose(profile.prune[:, 1, 0], np.minimum(rho, 1 - 36 / t), atol=1 / t)
    cache = LUKVCache(model.config, profile=profile, compression=0.5)
    assert [i for i, kind in enumerate(cache.kinds) if kind == "sliding"] == [0, 2]
    assert cache.layers[1].budget(np.array([t])).tolist() == [[t // 2]]
    with pytest.raises(ProfileError, match=r"left layers \[0\] out of its budget"):
        LUKVCache(tiny_config(), profile=Profile(np.full((NUM_RATIOS, 2, 2), 0.5) * [[0], [1]], excluded_layers=(0,)),
                  allow_other_model=True)


def test_shard_profiles_balance_the_kept_tokens():
    rng = np.random.default_rng(1)
    layers, heads, t = 2, 4, 120
    importance = torch.from_numpy(rng.lognormal(size=(layers, heads, t)) * rng.choice([0.01, 100], size=(1, heads, 1)))
    curves = cum_losses(importance, eviction_order(torch.from_numpy(rng.normal(size=(layers, heads, t))), 4, 8))
    graph = build_head_graph(layers, heads, heads, shards=2)
    prune = prune_fractions(curves, t, 4, 8, graph)
    kept = ((1 - prune) * t).reshape(NUM_RATIOS, -1)
    shard = unit_attr(graph, "shard")
    per_shard = np.stack([kept[:, shard == s].sum(1) for s in (0, 1)], axis=1)
    assert np.all(per_shard.max(1) - per_shard.min(1) <= np.maximum(0.05 * per_shard.mean(1), 1) + 1e-6)
    free = prune_fractions(curves, t, 4, 8, build_head_graph(layers, heads, heads))
    np.testing.assert_allclose(prune.mean(axis=(1, 2)), free.mean(axis=(1, 2)), atol=1e-9)
    with pytest.raises(ValueError, match="needs scope 'global'"):
        prune_fractions(curves, t, 4, 8, graph, scope="layer")


def test_profile_rejects_bad_inputs(model, tokenizer):
    with pytest.raises(ValueError, match="unknown scorer"):
        profile_scorers(model, tokenizer, ["snapkv", "h2o"], progress=False)
    with pytest.raises(ValueError, match="without repeats"):
        profile_scorers(model, tokenizer, ["snapkv", "snapkv"], progress=False)
    with pytest.raises(ValueError, match="nothing to evict"):
        profile_model(model, tokenizer, "snapkv", context="short", questions=["q"], progress=False)
    with pytest.raises(ValueError, match="num_questions"):
        profile_scorers(model, tokenizer, ["snapkv"], num_questions=31, progress=False)
    with pytest.raises(ValueError, match="scope"):
        profile_model(model, tokenizer, "snapkv", scope="heads", progress=False)
    with pytest.raises(ValueError, match="unknown prompt format 'json'; allowed: chat, plain"):
        profile_model(model, tokenizer, "snapkv", prompt_format="json", progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        profile_model(model, tokenizer, "snapkv", prompt_format="chat", progress=False)


# ---------------------------------------------------------------- torchrun scale-out


def run_cli(args: list[str], nproc: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(nproc), "-m"] if nproc > 1 else [sys.executable, "-m"]
    done = subprocess.run([*launcher, "lukv_compile.tools.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_give_the_same_profile_as_one(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    common = ["profile", str(folder), "--scorer", "snapkv,keydiff", "--questions", "3", "--k-max", "3",
              "--context-tokens", "100", "--no-progress", "--threads", "1"]
    run_cli([*common, "--out", str(tmp_path / "one-{scorer}.safetensors")])
    run_cli([*common, "--out", str(tmp_path / "two-{scorer}.safetensors")], nproc=2)
    for scorer in ("snapkv", "keydiff"):
        one = Profile.load(tmp_path / f"one-{scorer}.safetensors")
        two = Profile.load(tmp_path / f"two-{scorer}.safetensors")
        np.testing.assert_allclose(two.prune, one.prune, atol=1e-6)
        assert json.loads(two.calibration) == json.loads(one.calibration)
