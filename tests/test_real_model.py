"""SmolLM2-135M-Instruct (real pretrained weights, installed by scripts/setup.sh) through the lukv backend,
in the card's form and on the default inner compiler (inductor)."""

import pytest
import torch

from lukv_compile import full_cache_nbytes
from lukv_compile.tools.bench import passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lukv_compile.models import load_model

    return load_model("smollm2")


def test_smollm2_default_inner_is_exact_at_full_budget(smollm2):
    model, tokenizer = smollm2
    prompt, _ = passkey_prompt(tokenizer, 300)
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    eager = model.generate(**inputs, **kwargs)
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.0})  # inductor
    assert torch.equal(compiled.generate(**inputs, **kwargs), eager)


def test_smollm2_compressed_bytes(smollm2):
    model, tokenizer = smollm2
    prompt, _ = passkey_prompt(tokenizer, 1024)
    inputs = tokenizer(prompt, return_tensors="pt")
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    out = compiled.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    full_bytes = full_cache_nbytes(model.config, 1, out.sequences.shape[1] - 1, model.dtype)
    assert out.cache.nbytes() <= 0.23 * full_bytes
    held = sum(layer.store.keys.shape[0] for layer in out.cache.layers)  # K rows held, every head of every layer
    config = model.config
    assert held < 0.23 * inputs.input_ids.shape[1] * config.num_key_value_heads * config.num_hidden_layers


def test_the_one_line_is_lukv_with_the_shipped_profile_said_once(smollm2, caplog, monkeypatch):
    from lukv_compile import log
    from lukv_compile.profile import Profile
    from lukv_compile.profiles import DEFAULT_RANKINGS, SHIPPED_DIR

    monkeypatch.setattr(log, "_reported", set())  # what this process has said so far does not count
    model, tokenizer = smollm2
    inputs = tokenizer(passkey_prompt(tokenizer, 400)[0], return_tensors="pt")
    compiled = torch.compile(model, backend="lukv", options={"compression": 0.8})  # the card's form, inductor
    with caplog.at_level("WARNING", logger="lukv_compile"):
        for _ in range(2):
            out = compiled.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    name = f"smollm2-135m-instruct-{DEFAULT_RANKINGS[0]}.safetensors"
    shipped = Profile.load(SHIPPED_DIR / name)
    assert out.cache.profile.scorer == DEFAULT_RANKINGS[0] and (out.cache.profile.prune == shipped.prune).all()
    said = [r.getMessage() for r in caplog.records if "found by the model's config fingerprint" in r.getMessage()]
    assert len(said) == 1 and name in said[0], said
    kept = [len(p) for layer in out.cache.layers for p in layer.kept_positions()[0]]
    assert len(set(kept)) > 10  # per-head budgets, not one share for every head
