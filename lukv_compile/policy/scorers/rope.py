"""The model's RoPE frequencies per layer, computed from its config the way transformers does."""

from __future__ import annotations

from lukv_compile.policy.scorers.common import Rope


def layer_rope(config, layer_type: str | None) -> Rope | None:
    """The Rope of layers of `layer_type` (Gemma 3 keys rope_parameters by layer type), None without RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None)
    per_type = isinstance(params, dict) and layer_type in params and "rope_theta" not in params
    kwargs = {"layer_type": layer_type} if per_type else {}
    params = params[layer_type] if per_type else params
    if not params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return Rope.from_theta(int(head_dim * params.get("partial_rotary_factor", 1.0)), params["rope_theta"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return Rope(inv_freq.float())


def layer_ropes(config) -> list[Rope | None]:
    """Per layer of the model's text config, the Rope its attention applies (None where it has none)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    ropes = {t: layer_rope(config, t) for t in set(types)}
    return [ropes[t] for t in types]
