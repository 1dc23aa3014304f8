"""lukv as a good citizen of the user's process (issue 27): state where the user sees it, a compile budget
of its own, caches checked against the model, nothing silently uncompressed, nothing changed at import."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

import lukv_compile
from lukv_compile import CompileLimitError, LUKVCache, LUKVCacheError, LUKVWarning, Profile, ProfileError, compat
from lukv_compile.compiler import forward as forward_module
from lukv_compile.compiler.forward import CompiledForward
from lukv_compile.models import load_tokenizer

FAST = {"inner": "aot_eager"}


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)


def prompt(length=60, seed=0):
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def test_two_compiles_of_one_model_keep_their_own_options():
    """Finding 1: compiling again with other options leaves the first wrapper as it was."""
    model, ids = tiny_model(layers=4), prompt(200)
    plain = greedy(model, ids)
    c0 = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.0})
    c8 = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.8})
    out8 = c8.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    out0 = c0.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out0.sequences, plain)
    assert c0.lukv_settings.compression == 0.0 and c8.lukv_settings.compression == 0.8
    full, compressed = out0.cache.nbytes(), out8.cache.nbytes()
    assert compressed < 0.5 * full, (compressed, full)


def test_torch_compile_leaves_the_original_model_plain():
    """Finding 2: after torch.compile(model, backend="lukv") the model itself is exactly the plain model."""
    model, ids = tiny_model(layers=4), prompt()
    plain = greedy(model, ids)
    torch.compile(model, backend="eager")  # what any torch.compile does to the model (it marks it)
    before = dict(vars(model))
    compiled = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.8})
    compiled.generate(ids, max_new_tokens=6, do_sample=False)
    assert dict(vars(model)).keys() == before.keys()
    assert compat.compiled_call(model) is None
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert not isinstance(out.cache, LUKVCache)  # transformers' own cache: nothing compressed


def test_model_compile_is_in_place_and_undone_with_it():
    model, ids = tiny_model(layers=4), prompt()
    plain = greedy(model, ids)
    model.compile(backend="lukv", options=FAST | {"compression": 0.8})
    assert isinstance(compat.compiled_call(model), CompiledForward)
    assert isinstance(model.generate(ids, max_new_tokens=2, return_dict_in_generate=True).cache, LUKVCache)
    compat.set_compiled_call(model, None)
    assert torch.equal(greedy(model, ids), plain)


def test_a_notebook_of_models_and_generate_modes_keeps_working(monkeypatch):
    """Finding 3: many models and generate modes in one process; each compile has its own recompile budget
    (Dynamo's default 8 is shared by every model entering through nn.Module's call). With lukv's limit set to
    that same 8, the notebook makes more graphs than 8 in all, but never 8 in one compile."""
    monkeypatch.setattr(forward_module, "LUKV_RECOMPILE_LIMIT", 8)
    ids = prompt(40)
    padded = torch.cat([ids, torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:, 5:]], dim=1)])
    mask = (padded != 0).long()
    graphs = 0
    for family in ("llama", "qwen2", "mistral", "qwen3", "llama"):
        model = tiny_model(family, layers=2, seed=len(family))
        compiled = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.0})
        assert torch.equal(compiled.generate(ids, max_new_tokens=4, do_sample=False), greedy(model, ids)[:, :44])
        compiled.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
        compiled.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
        graphs = compat.counters()["lukv"]["graphs_compiled"]
    assert graphs > 8  # more than one shared budget of 8 would have allowed


def test_stop_strings_reuse_the_graphs_of_plain_generate():
    """generate() hands its tokenizer down to the layers with stop_strings; it must not make new graphs."""
    tokenizer = load_tokenizer("smollm2")
    model = tiny_model(layers=2, vocab=len(tokenizer))
    compiled = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.0})
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    want = greedy(model, ids, stop_strings=["."], tokenizer=tokenizer)
    compiled.generate(ids, max_new_tokens=6, do_sample=False)
    graphs = compat.counters()["lukv"]["graphs_compiled"]
    assert torch.equal(compiled.generate(ids, max_new_tokens=6, do_sample=False, stop_strings=["."],
                                         tokenizer=tokenizer), want)
    assert compat.counters()["lukv"]["graphs_compiled"] == graphs


def test_a_genuine_limit_names_itself_and_clears_with_a_reset(monkeypatch):
    monkeypatch.setattr(forward_module, "LUKV_RECOMPILE_LIMIT", 1)
    model, ids = tiny_model(layers=2), prompt(30)
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = torch.compile(model, backend="lukv", options=FAST | {"regional": False})
    with pytest.raises(CompileLimitError, match=r"recompile limit \(1 graphs.*torch._dynamo.reset\(\)"):
        compiled.generate(ids, max_new_tokens=3)  # prompt graph, then a decode graph: over the limit
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(input_ids=ids, cache=LUKVCache(model.config))  # one graph again: within the limit


@pytest.mark.parametrize("change", [{"num_key_value_heads": 1, "num_attention_heads": 4},
                                    {"num_hidden_layers": 3}, {"head_dim": 8}])
def test_a_cache_for_another_model_is_refused_before_work(change):
    """Finding 4: a cache whose layers / KV heads / head_dim differ from the model's is refused at once."""
    model, ids = tiny_model(layers=2), prompt(30)
    other = type(model.config)(**(model.config.to_dict() | change))
    compiled = torch.compile(model, backend="lukv", options=FAST)
    for call in (lambda: compiled.generate(ids, max_new_tokens=2, cache=LUKVCache(other)),
                 lambda: compiled(input_ids=ids, cache=LUKVCache(other))):
        with torch.no_grad(), pytest.raises(LUKVCacheError, match="built for a model with .* build the cache from"):
            call()
    assert compat.counters()["lukv"]["graphs_compiled"] == 0


def test_a_function_given_a_cache_of_another_shape_is_refused():
    """Without a module's config to compare with, the op itself checks the heads before storing anything."""
    model = tiny_model(layers=2)
    other = type(model.config)(**(model.config.to_dict() | {"num_key_value_heads": 1}))
    compiled = torch.compile(lambda ids, cache: model(input_ids=ids, cache=cache), backend="lukv", options=FAST)
    with torch.no_grad(), pytest.raises(Exception, match="built for 1 KV heads"):
        compiled(prompt(30), LUKVCache(other))


def test_a_prompt_too_short_to_compress_is_reported_once_per_cache():
    """Finding 5: a prompt within sink + window is kept whole, and the user is told (once per cache)."""
    model = tiny_model(layers=2)
    compiled = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.8})
    with pytest.warns(LUKVWarning, match="prompt of 30 tokens is not longer than sink \\+ window = 36") as said:
        out = compiled.generate(prompt(30), max_new_tokens=4, return_dict_in_generate=True)
    assert len([w for w in said if issubclass(w.category, LUKVWarning)]) == 1
    assert out.cache.layers[0].store.length.min() == 30 + 3  # the prompt whole, plus the decoded tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error", LUKVWarning)
        compiled.generate(prompt(60), max_new_tokens=2)  # long enough: compressed, nothing said
        exact = torch.compile(model, backend="lukv", options=FAST | {"compression": 0.0})
        exact.generate(prompt(30), max_new_tokens=2)  # nothing to compress was asked for


def test_numpy_scalars_are_numbers():
    assert lukv_compile.LUKVSettings(compression=np.float32(0.8)).compression == pytest.approx(0.8)
    assert LUKVCache(tiny_model().config, compression=np.float64(0.5)).settings.compression == 0.5


def test_a_wrong_shape_profile_does_not_suggest_allow_other_model():
    config = tiny_model(layers=2).config
    profile = Profile.uniform(3, 2)
    for allow in (False, True):
        with pytest.raises(ProfileError, match="must match the model's, even with allow_other_model=True"):
            LUKVCache(config, profile=profile, allow_other_model=allow)
    profile = Profile.uniform(2, 2)
    profile.fingerprint = "0" * 64
    with pytest.raises(ProfileError, match="pass allow_other_model=True"):
        LUKVCache(config, profile=profile)
    LUKVCache(config, profile=profile, allow_other_model=True)


def test_an_empty_prompt_is_a_clear_error():
    model = tiny_model(layers=2)
    compiled = torch.compile(model, backend="lukv", options=FAST)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="input_ids has 0 tokens"):
        compiled(input_ids=empty, cache=LUKVCache(model.config))
    with pytest.raises(ValueError, match="input_ids has 0 tokens"):
        compiled.generate(empty, max_new_tokens=2)


SNAPSHOT = """
import json, os, sys, logging
import torch, transformers
import torch._dynamo.eval_frame as ef, transformers.generation.utils as gu, transformers.cache_utils as cu
classes = [ef._TorchDynamoContext, ef.OptimizedModule, torch.nn.Module, gu.GenerationMixin, cu.Cache, cu.DynamicCache]
def state():
    members = {f"{c.__qualname__}.{k}": id(v) for c in classes for k, v in vars(c).items()}
    loggers = {n: len(logging.getLogger(n).filters) for n in ("torch._dynamo", "torch._dynamo.convert_frame")}
    return members, dict(os.environ), loggers
before = state()
import lukv_compile
from lukv_compile import compat
after = state()
torch._dynamo.lookup_backend("lukv")
print(json.dumps({"same": before == after, "changed": sorted(set(before[0].items()) ^ set(after[0].items())),
                  "env": sorted(set(before[1].items()) ^ set(after[1].items())),
                  "hooked_at_import": "lukv_hook" in repr(vars(ef._TorchDynamoContext)),
                  "hooked_after_lookup": compat.hooks_installed()}))
"""


def test_import_changes_nothing_and_the_backend_lookup_installs_the_hooks():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["same"], seen
    assert seen["hooked_after_lookup"]


def test_touch_points_are_all_present():
    assert compat.check_touch_points() == []


def test_a_moved_touch_point_is_named_with_the_versions(monkeypatch):
    monkeypatch.delattr(torch._dynamo.exc, "FailOnRecompileLimitHit")
    failures = compat.check_touch_points()
    assert len(failures) == 1
    assert "torch._dynamo.exc.FailOnRecompileLimitHit" in failures[0] and f"torch {torch.__version__}" in failures[0]


def test_hooks_are_one_pair_and_come_off():
    assert compat.hooks_installed()  # conftest compiled through the backend
    mixin = compat.generation_mixin()
    hooked = mixin.generate
    compat.uninstall_hooks()
    try:
        assert not compat.hooks_installed() and mixin.generate is hooked.__wrapped__
    finally:
        from lukv_compile.compiler import entry

        entry.install()
    assert compat.hooks_installed()


def attend_three_times(q, k, v, q2, k2, v2, handle):
    """Prompt, then the same chunk twice (its first output unused): three appends, in this order."""
    first = torch.ops.lukv.attend(q, k, v, None, True, handle, 0, 0.25)
    torch.ops.lukv.attend(q2, k2, v2, None, True, handle, 0, 0.25)
    second = torch.ops.lukv.attend(q2, k2, v2, None, True, handle, 0, 0.25)
    return first, second


WITHOUT_EFFECT = """
import torch, lukv_compile
from lukv_compile import LUKVCache
from lukv_compile.runtime import registry
from tiny_models import tiny_model

@torch.library.custom_op("lukvtest::attend", mutates_args=())  # the same op, declared free of side effects
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
           handle: torch.Tensor, layer_idx: int, scale: float) -> torch.Tensor:
    return registry.layer(handle, layer_idx).attend(q, k, v, attn_mask, is_causal, scale)

attend.register_fake(lambda q, *args: q.new_empty(q.shape))
torch.ops.lukv.attend = torch.ops.lukvtest.attend
from test_citizen import attend_three_times
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, 8, 16, generator=g) for h in (4, 2, 2))
q2, k2, v2 = (torch.randn(1, h, 3, 16, generator=g) for h in (4, 2, 2))
cache = LUKVCache(tiny_model(layers=2).config, compression=0.0)
torch.compile(attend_three_times, backend="inductor")(q, k, v, q2, k2, v2, cache.handle)
print(cache.layers[0].seen)
"""


@pytest.mark.slow
def test_inductor_neither_reorders_merges_nor_drops_attend():
    """lukv::attend declares what it changes (the cache its handle names): an unused call still runs, two alike
    calls stay two, in order."""
    config = tiny_model(layers=2).config
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, generator=g) for h in (4, 2, 2))
    q2, k2, v2 = (torch.randn(1, h, 3, 16, generator=g) for h in (4, 2, 2))
    runs = {}
    compiled = torch.compile(attend_three_times, backend="inductor")
    for name, fn in (("eager", attend_three_times), ("inductor", compiled)):
        cache = LUKVCache(config, compression=0.0)
        outputs = fn(q, k, v, q2, k2, v2, cache.handle)
        runs[name] = (outputs, cache.layers[0].seen, cache.layers[0].store.num_tokens)
    (eager_out, eager_seen, eager_held), (out, seen, held) = runs["eager"], runs["inductor"]
    assert (seen, held) == (eager_seen, eager_held) == (14, 2 * 14)  # 8 + 3 + 3 positions, in both KV heads
    for a, b in zip(out, eager_out, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(out[1], torch.ops.lukv.attend(q2, k2, v2, None, True,
                                                          LUKVCache(config).handle, 0, 0.25))  # the 2nd saw the 1st
    # The check bites: the same op declared free of side effects (in a fresh process, so lukv::attend's
    # registration is untouched here) has its unused call dropped or its twins merged: fewer tokens arrive.
    result = subprocess.run([sys.executable, "-c", WITHOUT_EFFECT], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 14
