"""SmolLM2-135M-Instruct (real pretrained weights, installed by scripts/setup.sh) through the lukv backend."""

import pytest
import torch

from lukv_compile import full_cache_nbytes
from lukv_compile.bench import passkey_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lukv_compile.models import load_model

    return load_model("smollm2")


def test_smollm2_compressed_bytes_and_full_budget_tokens(smollm2):
    model, tokenizer = smollm2
    prompt, _ = passkey_prompt(tokenizer, 1024)
    inputs = tokenizer(prompt, return_tensors="pt")
    eager = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    model.compile(backend="lukv", options={"compression": 0.0, "inner": "aot_eager"})
    full_budget = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(full_budget, eager)

    model.compile(backend="lukv", options={"compression": 0.8, "inner": "aot_eager"})
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    full_bytes = full_cache_nbytes(model.config, 1, out.sequences.shape[1] - 1, model.dtype)
    assert out.cache.nbytes() <= 0.21 * full_bytes
    assert out.cache.layers[0].keys.shape[0] < 0.21 * inputs.input_ids.shape[1] * model.config.num_key_value_heads
