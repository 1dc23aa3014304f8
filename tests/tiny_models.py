"""Tiny random transformers models for tests (no weights, no network)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", layers: int = 2, q_heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 128, seed: int = 0):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(hidden_size=q_heads * head_dim, intermediate_size=64, num_attention_heads=q_heads,
                        num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers,
                        vocab_size=vocab, max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_gemma3(seed: int = 0):
    """Gemma 3 text model: sliding-window layers (left exact) around one global layer (compressed)."""
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=16, num_hidden_layers=3, vocab_size=128, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


def left_padded_batch(lengths: list[int], vocab: int = 128, seed: int = 0):
    """input_ids and attention_mask for rows of the given real lengths, left-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask
