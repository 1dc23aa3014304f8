"""LU-KV on a plain PyTorch module (no transformers): K/V live in a LUKVCache, attention is SDPA.

Any module works if its attention reads the cache the way transformers' models do:

    k, v = cache.update(k, v, layer_idx)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=True)

and is compiled with the lukv backend, which rewrites each such attention into one op that attends
over the tokens the cache keeps for every KV head. The cache is built from any config object with
num_hidden_layers, num_key_value_heads, num_attention_heads and hidden_size.

The script runs a small random-weight decoder on a 256-token prompt plus greedy decode steps twice:
at compression 0 (nothing evicted) it must match the same module run eagerly with a plain dense
cache; at compression 0.8 every KV head keeps ~20% of the prompt.

    python examples/plain_pytorch_module.py
"""

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lukv_compile

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
parser.add_argument("--steps", type=int, default=16, help="greedy decode steps")
parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
args = parser.parse_args()


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache, layer_idx):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1)
        k, v = cache.update(k, v, layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, vocab=1000, dim=256, heads=8, kv_heads=2, layers=4, max_len=4096):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads,
                                      num_attention_heads=heads, hidden_size=dim)
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, cache):
        start = cache.get_seq_length()  # tokens already seen: the new tokens' first position
        positions = torch.arange(start, start + tokens.shape[1])
        x = self.embed(tokens) + self.pos(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.head(x)


class DenseCache:
    """The reference: every layer keeps all its keys and values."""

    def __init__(self):
        self.kv = {}

    def update(self, k, v, layer_idx):
        if layer_idx in self.kv:
            k = torch.cat([self.kv[layer_idx][0], k], dim=2)
            v = torch.cat([self.kv[layer_idx][1], v], dim=2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def get_seq_length(self):
        return self.kv[0][0].shape[2] if self.kv else 0

    def nbytes(self):
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)


def greedy(model, cache, prompt, steps):
    """Logits of the prompt's last position and of each decode step, [steps + 1, vocab]."""
    logits = [model(prompt, cache)[:, -1]]
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
    return torch.cat(logits)


torch.manual_seed(0)
model = Decoder().eval()
prompt = torch.randint(0, 1000, (1, args.prompt))
compiled = torch.compile(model, backend="lukv", options={"inner": args.inner})

with torch.no_grad():
    dense = DenseCache()
    reference = greedy(model, dense, prompt, args.steps)
    for compression in (0.0, 0.8):
        cache = lukv_compile.LUKVCache(model.config, compression=compression)  # no profile: same budget per head
        logits = greedy(compiled, cache, prompt, args.steps)
        agree = (logits.argmax(-1) == reference.argmax(-1)).sum().item()
        print(f"compression {compression}: max abs logit diff vs dense {(logits - reference).abs().max().item():.2e}, "
              f"greedy tokens agreeing {agree}/{args.steps + 1}, KV held {cache.nbytes() / 2**10:.0f} KiB "
              f"vs dense {dense.nbytes() / 2**10:.0f} KiB ({cache.nbytes() / dense.nbytes():.3f}x)", flush=True)
        if compression == 0.0:
            torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
            print("compression 0.0 matches the dense cache", flush=True)
