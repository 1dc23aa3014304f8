"""What lukv reads off a transformers config: layer kinds, KV shape, and the fingerprints profiles and saved
caches are tied to."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Fields that decide the shapes and the maths of attention; a profile is only valid for a model
# whose fingerprint over these matches.
_ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def layer_kinds(config) -> list[str]:
    """'ragged' for layers LU-KV compresses, 'sliding' for sliding-window layers it leaves exact.

    With `layer_types`, its sliding layers; without, every layer slides when `sliding_window` is set
    (Mistral, Phi-3: their masks slide on every layer). Other layer types are refused.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding" if sliding else "ragged"] * config.num_hidden_layers
    kinds = {"full_attention": "ragged", "sliding_attention": "sliding"}
    unknown = sorted({t for t in layer_types if t not in kinds})
    if unknown:
        raise ValueError(f"LUKVCache does not support layer type(s) {', '.join(unknown)}; it serves "
                         f"{', '.join(kinds)}")
    return [kinds[t] for t in layer_types]


def sliding_layers(config) -> list[int]:
    """Layers LU-KV leaves exact (`layer_kinds` 'sliding'): the profiler gives them no budget."""
    return [i for i, kind in enumerate(layer_kinds(text_config(config))) if kind == "sliding"]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_identity(model: Any) -> dict:
    """Shape facts a profile is tied to: id, model_type, layer count, query/KV heads, head_dim."""
    config = text_config(model.config)
    num_layers, num_kv_heads, head_dim = kv_shape(config)
    return {
        "model_id": config.name_or_path,
        "model_type": config.model_type,
        "num_layers": num_layers,
        "num_q_heads": config.num_attention_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
    }


def config_fingerprint(config: Any) -> str:
    """sha256 over the architecture-relevant config fields (independent of dtype, paths, versions)."""
    config = text_config(config)
    fields = {key: getattr(config, key, None) for key in _ARCH_FIELDS}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


WEIGHT_SAMPLES = 64  # values read from each parameter for its fingerprint


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and WEIGHT_SAMPLES values spread over it.

    Tells two checkpoints of one architecture apart (a cache's K/V are only right for the weights that made
    them) in milliseconds, without reading every weight of a large model.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, weight in sorted(module.named_parameters(), key=lambda item: item[0]):
            flat = weight.detach().reshape(-1)
            samples = min(WEIGHT_SAMPLES, flat.numel())
            index = torch.arange(samples, device=flat.device) * (flat.numel() - 1) // max(samples - 1, 1)
            digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
            digest.update(flat[index].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a model's KV cache: what a cache must match to serve the model."""
    config = text_config(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim_of(config)
