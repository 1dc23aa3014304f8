"""Plain PyTorch models that keep their own KV buffers, as the code users run does (tests/test_buffer_models.py).

`gpt_fast`: examples/gpt_fast_style.py's Transformer as it is (buffers written at `input_pos`, the mask a slice
of a `tril` buffer). Two variants change only the KV cache and where the mask comes from:
`index_copy`: the write is `index_copy_` (litgpt, transformers' StaticCache);
`torchtune`: the cache counts its own positions (`cache_pos`, advanced in place after each write) and the
caller passes the mask, as torchtune's generation utilities do; `prefix`: the chunk is written into a slice
and attention reads the filled prefix with no mask (causal when the chunk has several tokens).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt_fast_style.py"


def load_example():
    if "gpt_fast_style" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpt_fast_style", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpt_fast_style"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpt_fast_style"]


gfs = load_example()


class CachePosKVCache(gfs.KVCache):
    """torchtune's KVCache: writes at its own counter, `cache_pos`, then advances it in place."""

    def __init__(self, batch: int, heads: int, max_seq_length: int, head_dim: int, dtype: torch.dtype):
        super().__init__(batch, heads, max_seq_length, head_dim, dtype)
        self.register_buffer("cache_pos", torch.arange(max_seq_length), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        seq_len = k_val.shape[2]
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, self.cache_pos[:seq_len]] = k_val
        v_out[:, :, self.cache_pos[:seq_len]] = v_val
        self.cache_pos.add_(seq_len)
        return k_out, v_out


class IndexCopyKVCache(gfs.KVCache):
    """litgpt's and transformers' StaticCache's write: `index_copy_` along the sequence dimension."""

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache.index_copy_(2, input_pos, k_val)
        self.v_cache.index_copy_(2, input_pos, v_val)
        return self.k_cache, self.v_cache


class IndexCopy(gfs.Transformer):
    kv_cache_class = IndexCopyKVCache


class TorchtuneStyle(gfs.Transformer):
    """The caller passes the mask [B, C, S_max] and each row's position ids [B, C] (torchtune's generate: left
    padding is masked out, and real tokens count their positions from 0)."""

    kv_cache_class = CachePosKVCache

    def forward(self, idx: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        cos, sin = self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None]  # [B, 1, C, D]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask[:, None], input_pos)
        return self.output(self.norm(x))


class PrefixKVCache(gfs.KVCache):
    """Smaller repos' cache: a slice write, and attention over the filled prefix `[:start + C]`."""

    def update(self, start: int, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k_val.shape[2]
        self.k_cache[:, :, start:end] = k_val
        self.v_cache[:, :, start:end] = v_val
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


class PrefixAttention(gfs.Attention):
    """Attention over the filled prefix with no mask: causal for the prompt (at position 0), plain for a token."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: None, start: int) -> Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_local_heads, self.head_dim).transpose(1, 2)
        q, k = gfs.apply_rope(q, cos, sin), gfs.apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(start, k, v)
        if seqlen > 1:  # a branch, not is_causal=seqlen > 1: Dynamo passes no symbolic bool to SDPA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class PrefixSlice(gfs.Transformer):
    """`forward(idx, start)`: the chunk's first position as an int; no mask."""

    kv_cache_class = PrefixKVCache

    def __init__(self, args):
        super().__init__(args)
        for layer in self.layers:
            layer.attention.__class__ = PrefixAttention

    def forward(self, idx: Tensor, start: int) -> Tensor:
        positions = torch.arange(start, start + idx.shape[1])
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, None, start)
        return self.output(self.norm(x))


VARIANTS = {"gpt_fast": gfs.Transformer, "torchtune": TorchtuneStyle, "prefix": PrefixSlice, "index_copy": IndexCopy}


def tiny(variant: str, layers: int = 4, seed: int = 0) -> gfs.Transformer:
    torch.manual_seed(seed)
    args = gfs.ModelArgs(vocab_size=128, dim=64, n_layer=layers, n_head=4, n_local_heads=2, intermediate_size=128)
    return VARIANTS[variant](args).eval()


def torchtune_mask(pads: Tensor, max_seq_length: int) -> Tensor:
    """torchtune's causal mask with left padding [B, S, S]: causal, padding columns hidden, and a padding token
    seeing itself (get_causal_mask_from_padding_mask)."""
    index = torch.arange(max_seq_length)
    mask = (index[None, :] <= index[:, None])[None] & (index[None, None, :] >= pads[:, None, None])
    return mask | torch.eye(max_seq_length, dtype=torch.bool)[None]


def step_inputs(model: gfs.Transformer, tokens: Tensor, start: int, pads: Tensor | None = None) -> tuple:
    """The forward's arguments for `tokens` [B, C] at positions start..start+C-1, in the variant's convention;
    `pads` [B]: each row's left padding (the torchtune variant only)."""
    chunk = tokens.shape[1]
    positions = torch.arange(start, start + chunk)
    if model.kv_cache_class is PrefixKVCache:  # the model, or its torch.compile wrapper (which passes it on)
        return tokens, start
    if model.kv_cache_class is CachePosKVCache:
        pads = torch.zeros(tokens.shape[0], dtype=torch.long) if pads is None else pads
        mask = torchtune_mask(pads, model.max_seq_length)[:, positions]
        return tokens, (positions[None] - pads[:, None]).clamp(min=0), mask
    assert pads is None, "only the torchtune variant takes padding"
    return tokens, positions


@torch.no_grad()
def run_chunks(model, prompt: Tensor, chunks: list[int], decode_steps: int, max_seq_length: int,
               pads: Tensor | None = None) -> list[Tensor]:
    """Logits of each forward: the prompt in `chunks`, then greedy decode steps (caches set up afresh); `pads`:
    the left padding of each prompt row (the torchtune variant)."""
    model.setup_caches(prompt.shape[0], max_seq_length)
    outputs, start = [], 0
    for size in chunks:
        tokens = prompt[:, start:start + size].clone(memory_format=torch.contiguous_format)  # strides of its own
        outputs.append(model(*step_inputs(model, tokens, start, pads)))
        start += size
    token = outputs[-1][:, -1:].argmax(-1)
    for _ in range(decode_steps):
        outputs.append(model(*step_inputs(model, token, start, pads)))
        start += 1
        token = outputs[-1][:, -1:].argmax(-1)
    return outputs
