"""Tiny random transformers models for tests (no weights, no network); the comparisons they are tested with are
lukv_compile.testing's, the ones users' CI runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

from lukv_compile.testing.generation import (  # noqa: F401  (the tests import them from here)
    assert_same_conversation,
    assert_same_generation,
    conversation,
    generate_logits,
    left_padded_batch,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", layers: int = 2, q_heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 128, seed: int = 0, **extra):
    """A random model of `family`; full attention on every layer unless `extra` sets a sliding window."""
    config_cls, model_cls = FAMILIES[family]
    extra.setdefault("sliding_window", None)  # MistralConfig slides every layer by default (4096)
    config = config_cls(hidden_size=q_heads * head_dim, intermediate_size=64, num_attention_heads=q_heads,
                        num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers,
                        vocab_size=vocab, max_position_embeddings=1024, attn_implementation="sdpa", **extra)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_gemma3(seed: int = 0, kv_heads: int = 1):
    """Gemma 3 text model: sliding-window layers (left exact) around one global layer (compressed)."""
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=kv_heads,
                              head_dim=16, num_hidden_layers=3, vocab_size=128, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


class PlainAttentionModel(torch.nn.Module):
    """A plain PyTorch model (no transformers) that keeps its K/V in a cache with `update(k, v, layer)`."""

    class DenseCache:
        """The uncompressed reference cache for the same model."""

        def __init__(self):
            self.kv = {}

        def update(self, k, v, i):
            if i in self.kv:
                k, v = torch.cat([self.kv[i][0], k], 2), torch.cat([self.kv[i][1], v], 2)
            self.kv[i] = (k, v)
            return k, v

    def __init__(self, dim=32, heads=4, kv_heads=2, layers=2, vocab=64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim) for _ in range(layers))
        self.out = torch.nn.Linear(dim, vocab)

    def attention(self, q, k, v, t):
        # Causal with the new tokens last (SDPA's is_causal aligns top-left, wrong once the cache holds a past).
        kv = k.shape[2]
        mask = torch.ones(t, kv, dtype=torch.bool, device=q.device).tril(kv - t)[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def forward(self, tokens, cache):
        x = self.embed(tokens)
        b, t, _ = x.shape
        for i, proj in enumerate(self.qkv):
            q, k, v = proj(x).view(b, t, -1, self.head_dim).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            k, v = cache.update(k, v, i)
            x = x + self.attention(q, k, v, t).transpose(1, 2).reshape(b, t, -1)
        return self.out(x)
