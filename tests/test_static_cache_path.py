"""transformers' static-cache path served by lukv (issue 28, its transformers part): `generate(cache_implementation=
"static")` on a lukv-compiled model, and transformers' torch.compile recipe (`generation_config.cache_implementation
= "static"` + `model.forward = torch.compile(model.forward, backend=...)`), both with a LUKVCache in place of
the StaticCache: equal to the eager static-cache generate at compression 0, compressed at 0.8."""

import pytest
import torch
from tiny_models import tiny_model

from lukv_compile import LUKVCache, compat, full_cache_nbytes
from lukv_compile.compiler.forward import CompiledForward

FAST = {"inner": "aot_eager"}


def prompt(length=200, seed=0):
    return torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def static_generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("compression", [0.0, 0.8])
def test_generate_with_cache_implementation_static(compression):
    model, ids = tiny_model(layers=3), prompt()
    want = static_generate(model, ids)
    compiled = torch.compile(model, backend="lukv", options=FAST | {"compression": compression})
    got = static_generate(compiled, ids)
    assert isinstance(got.cache, LUKVCache)
    if compression == 0.0:
        assert torch.equal(got.sequences, want.sequences)
    else:
        assert got.cache.nbytes() < 0.6 * full_cache_nbytes(model.config, 1, ids.shape[1] + 6, torch.float32)


@pytest.mark.parametrize("regional", [None, False])
def test_transformers_compile_recipe(regional):
    """generation_config.cache_implementation = "static" and the forward compiled on its own, with lukv."""
    reference, ids = tiny_model(layers=3), prompt(60)
    reference.generation_config.cache_implementation = "static"
    want = reference.generate(ids, max_new_tokens=6, do_sample=False)
    model = tiny_model(layers=3)  # the same weights (seeded)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, backend="lukv", options=FAST | {"compression": 0.0,
                                                                                "regional": regional})
    assert isinstance(model.forward, CompiledForward) and compat.compiled_call(model) is None
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert isinstance(out.cache, LUKVCache)
    assert model.generation_config.cache_implementation == "static"  # the user's config is left as it was
    graphs = compat.counters()["lukv"]["graphs_compiled"]
    model.generate(prompt(45, seed=1), max_new_tokens=4, do_sample=False)  # another length: no new graph
    assert compat.counters()["lukv"]["graphs_compiled"] == graphs


def test_cache_kinds_a_lukv_cache_cannot_stand_in_for_are_refused():
    model, ids = tiny_model(layers=2), prompt(30)
    compiled = torch.compile(model, backend="lukv", options=FAST)
    with pytest.raises(ValueError, match="cache_implementation='offloaded' cannot be combined with the lukv "
                                         "backend.*stands in for static, dynamic"):
        compiled.generate(ids, max_new_tokens=2, cache_implementation="offloaded")
    assert compat.counters()["lukv"]["graphs_compiled"] == 0
