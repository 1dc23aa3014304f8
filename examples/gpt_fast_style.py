"""SmolLM2 in a plain gpt-fast-style PyTorch module, its KV cache compressed by lukv with one line.

The module keeps its own KV cache as gpt-fast does: dense `[batch, kv_heads, max_seq_length, head_dim]`
buffers per layer, written in place at `input_pos`, attention over the whole buffer with the slice
`causal_mask[None, None, input_pos]` of a `tril` mask. Nothing in it knows about lukv:

    model = torch.compile(model, backend="lukv", options={"compression": 0.8})

finds those buffers in the graph, serves each attention from ragged per-head storage and frees the dense
buffers. `convert_hf_checkpoint` maps transformers' weight names to this module's, as gpt-fast's own
convert script does.

    python examples/gpt_fast_style.py            # greedy tokens == transformers', then the passkey at 0.8
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_local_heads: int  # KV heads (GQA)
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def from_hf(cls, config) -> ModelArgs:
        return cls(vocab_size=config.vocab_size, dim=config.hidden_size, n_layer=config.num_hidden_layers,
                   n_head=config.num_attention_heads, n_local_heads=config.num_key_value_heads,
                   intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps,
                   rope_base=config.rope_parameters["rope_theta"], tie_embeddings=config.tie_word_embeddings)


class KVCache(nn.Module):
    def __init__(self, batch: int, heads: int, max_seq_length: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as transformers' Llama applies it (halves rotated), so its weights need no permutation."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_head * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_local_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_local_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_local_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(args), FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """gpt-fast's Transformer: `setup_caches` allocates the dense KV buffers, `forward(idx, input_pos)`."""

    kv_cache_class = KVCache

    def __init__(self, args: ModelArgs, config=None):
        super().__init__()
        self.args = args
        self.config = config  # the transformers config of the weights, if any: lukv matches profiles by it
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_length = 0

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        args, dtype = self.args, self.output.weight.dtype
        self.max_seq_length = max_seq_length
        for layer in self.layers:
            layer.attention.kv_cache = self.kv_cache_class(max_batch_size, args.n_local_heads, max_seq_length,
                                                           args.head_dim, dtype)
        inv_freq = 1.0 / args.rope_base ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
        angles = torch.outer(torch.arange(max_seq_length).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(dtype), persistent=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool)),
                             persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        mask = self.causal_mask[None, None, input_pos]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))


def convert_hf_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers Llama weight names -> this module's (gpt-fast's convert_hf_checkpoint, without the
    q/k permutation: apply_rope rotates halves as transformers does)."""
    renames = {"model.embed_tokens.": "tok_embeddings.", "model.norm.": "norm.", "lm_head.": "output.",
               "self_attn.q_proj.": "attention.wq.", "self_attn.k_proj.": "attention.wk.",
               "self_attn.v_proj.": "attention.wv.", "self_attn.o_proj.": "attention.wo.",
               "mlp.gate_proj.": "feed_forward.w1.", "mlp.up_proj.": "feed_forward.w3.",
               "mlp.down_proj.": "feed_forward.w2.", "input_layernorm.": "attention_norm.",
               "post_attention_layernorm.": "ffn_norm.", "model.layers.": "layers."}
    converted = {}
    for name, tensor in state_dict.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        converted[name] = tensor
    return converted


def from_transformers(hf_model) -> Transformer:
    """A Transformer holding `hf_model`'s weights (a transformers Llama-family causal LM)."""
    config = hf_model.config
    model = Transformer(ModelArgs.from_hf(config), config=config)
    missing, unexpected = model.load_state_dict(convert_hf_checkpoint(hf_model.state_dict()), strict=False)
    if unexpected or [m for m in missing if not (config.tie_word_embeddings and m == "output.weight")]:
        raise ValueError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    return model.to(hf_model.dtype).eval()


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, max_seq_length: int | None = None) -> Tensor:
    """gpt-fast's greedy generate: set up the caches, prefill at positions 0..T-1, then one token per step.

    `model` is the module or its compiled form; `prompt` is [batch, T] token ids.
    """
    batch, length = prompt.shape
    model.setup_caches(batch, max_seq_length or length + max_new_tokens)  # a torch.compile wrapper passes it on
    input_pos = torch.arange(length)
    token = model(prompt, input_pos)[:, -1:].argmax(-1)
    tokens = [token]
    for step in range(max_new_tokens - 1):
        token = model(token, torch.tensor([length + step]))[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def dense_kv_bytes(model: Transformer) -> int:
    """Bytes the model's own K/V buffers hold now (0 once lukv has freed them)."""
    return sum(b.untyped_storage().nbytes() for n, b in model.named_buffers() if n.endswith(("k_cache", "v_cache")))


def main() -> None:
    import lukv_compile
    from lukv_compile.eval.methods import profile_path
    from lukv_compile.models import load_model
    from lukv_compile.tools.bench import passkey_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", type=float, default=0.8)
    parser.add_argument("--context", type=int, default=1024, help="passkey prompt length in tokens")
    parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()
    hf_model, tokenizer = load_model("smollm2")
    model = from_transformers(hf_model)

    # 1. Converted right: greedy tokens of this module == transformers' (no lukv involved).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ours = generate(model, ids, 12)
    theirs = hf_model.generate(ids, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    print(f"plain module == transformers: {torch.equal(ours, theirs)} ({tokenizer.decode(ours[0])!r})", flush=True)

    # 2. The one line, at compression 0 (exact) and at args.compression with the LU-KV profile shipped for SmolLM2.
    exact = torch.compile(model, backend="lukv", options={"compression": 0.0, "inner": args.inner})
    print(f"lukv at compression 0 == plain module: {torch.equal(generate(exact, ids, 12), ours)}", flush=True)
    prompt, answers = passkey_prompt(tokenizer, args.context)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    compiled = torch.compile(model, backend="lukv", options={
        "compression": args.compression, "profile": profile_path(hf_model, "snapkv"), "inner": args.inner})
    max_seq_length = ids.shape[1] + 16
    answer = tokenizer.decode(generate(compiled, ids, 16, max_seq_length)[0], skip_special_tokens=True).strip()
    held = lukv_compile.buffer_cache(compiled).nbytes()
    dense = dense_kv_bytes_at(model, max_seq_length)
    print(f"prompt: {ids.shape[1]} tokens, passkey {answers[0]}; compression {args.compression}", flush=True)
    print(f"answer: {answer!r} ({'found' if all(a in answer for a in answers) else 'missed'} the passkey)", flush=True)
    print(f"KV cache: {held / 2**20:.2f} MiB held by lukv vs {dense / 2**20:.2f} MiB in the model's dense buffers "
          f"({held / dense:.3f}x); the buffers now hold {dense_kv_bytes(model)} bytes", flush=True)


def dense_kv_bytes_at(model: Transformer, max_seq_length: int) -> int:
    """Bytes `setup_caches(1, max_seq_length)` allocates for K and V over all layers."""
    a = model.args
    return 2 * a.n_layer * a.n_local_heads * max_seq_length * a.head_dim * model.output.weight.element_size()


if __name__ == "__main__":
    main()
