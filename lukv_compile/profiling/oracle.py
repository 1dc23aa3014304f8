"""Oracle importance: how much each context token is used by the model's own future generation.

For a causal LM and a calibration context, `record_prefill` runs the context once and keeps every
layer's post-RoPE q/k/v plus the value-output weights n[l, h, j] = ||v[l, g(h), j] @ W_O[h]^T||_2
(normalised per layer). `oracle_importance` then continues from a copy of that full cache with a
question and K sampled decode steps, and keeps per layer the running max over steps of
max_{h in group g} A[l, h, k, j] * n[l, h, j] over context positions j: I[L, H_kv, T_ctx].

Tensors are captured by a custom attention function registered through transformers'
AttentionInterface: it hands q/k/v to the active hook and then runs the stock SDPA kernel, so the
long prefill never needs eager attention. Decode-step probabilities are recomputed from the captured
q and k (one query row per head, cheap).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch

RECORD_IMPL = "lukv_record"

# The hook the registered attention function calls; set only inside `recording()`.
_active_hook: Callable | None = None


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _active_hook is not None:
        _active_hook(module, query, key, value, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RECORD_IMPL, _recording_attention)
    AttentionMaskInterface.register(RECORD_IMPL, sdpa_mask)  # the SDPA kernel below wants SDPA-format masks


@contextlib.contextmanager
def recording(model, hook: Callable) -> Iterator[None]:
    """Run `model` with attention routed through `hook(module, q, k, v, mask, scaling)`, then restore it."""
    global _active_hook
    if _active_hook is not None:
        raise RuntimeError("an oracle recording is already active (recordings do not nest)")
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORD_IMPL)
    _active_hook = hook
    try:
        yield
    finally:
        _active_hook = None
        model.set_attn_implementation(previous)


def value_output_weights(v: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """n[h, j] = ||v[g(h), j] @ W_O[h]^T||_2, normalised to sum to 1 over heads and tokens.

    v [1, H_kv, T, D]; o_proj_weight [hidden, Hq * D] (nn.Linear layout, head h = columns h*D:(h+1)*D).
    """
    _, h_kv, t, d = v.shape
    hidden = o_proj_weight.shape[0]
    hq = o_proj_weight.shape[1] // d
    w = o_proj_weight.float().view(hidden, hq, d).transpose(0, 1)  # [Hq, hidden, D]
    vq = v[0].float().repeat_interleave(hq // h_kv, dim=0)  # [Hq, T, D]
    n = torch.linalg.vector_norm(torch.einsum("htd,hed->hte", vq, w), dim=-1)  # [Hq, T]
    return n / (n.sum() + 1e-9)


@dataclass
class PrefillRecord:
    """Everything the profiler needs from one context prefill, shared by every question."""

    q: list[torch.Tensor]  # per layer [1, Hq, T, D] post-RoPE, float32
    k: list[torch.Tensor]  # per layer [1, H_kv, T, D]
    v: list[torch.Tensor]
    scaling: list[float]
    value_weights: torch.Tensor  # n [L, Hq, T]
    cache: object  # the model's KV cache right after the context (copied per question)
    last_logits: torch.Tensor  # [vocab] the prefill's next-token logits

    @property
    def context_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_kv_heads(self) -> int:
        return self.k[0].shape[1]


def _layer_index(module) -> int:
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"attention module {type(module).__name__} has no layer_idx; cannot record it")
    return layer


@torch.no_grad()
def record_prefill(model, context_ids: torch.Tensor) -> PrefillRecord:
    """Prefill `context_ids` ([1, T] or [T]) and capture q/k/v, scaling and value-output weights per layer."""
    ids = _as_batch(context_ids, "context_ids")
    num_layers = model.config.get_text_config().num_hidden_layers
    q, k, v, scaling, weights = ([None] * num_layers for _ in range(5))

    def hook(module, query, key, value, mask, scale):
        layer = _layer_index(module)
        q[layer], k[layer], v[layer] = query.float(), key.float(), value.float()
        scaling[layer] = float(scale if scale is not None else query.shape[-1] ** -0.5)
        weights[layer] = value_output_weights(value, module.o_proj.weight)

    with recording(model, hook):
        out = model(input_ids=ids.to(model.device), use_cache=True, logits_to_keep=1)
    missing = [layer for layer in range(num_layers) if k[layer] is None]
    if missing:
        raise RuntimeError(f"attention was not recorded for layers {missing}")
    return PrefillRecord(q, k, v, scaling, torch.stack(weights), out.cache, out.logits[0, -1].float())


def _as_batch(ids: torch.Tensor, name: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a non-empty 1-D (or [1, T]) integer token tensor, got {tuple(ids.shape)}")
    return ids.long()


# Queries per block of `decode_importance`: a reconstruction pass repeats the whole context in one forward, and
# its [Hq, queries, S] attention at once would hold gigabytes per layer at 8k (SmolLM2: 9 x 8k x 16k fp32).
# Measured on compress_context over a 4k SmolLM2 document: peak RSS 5.28 -> 2.89 GB, time 72.8 -> 75.9 s.
QUERY_BLOCK = 512


def decode_importance(importance: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      value_weights: torch.Tensor, scaling: float) -> None:
    """importance [H_kv, P] = max(importance, A * n) over the chunk's queries and each KV head's GQA group.

    query [1, Hq, c, D] are the last c of the S positions of key [1, H_kv, S, D] (unpadded, causal:
    query i sees keys up to S - c + i); A is their attention over the first P keys, n = value_weights
    [Hq, P] (`value_output_weights`).
    """
    hq, c, h_kv = query.shape[1], query.shape[2], key.shape[1]
    s, p = key.shape[2], importance.shape[-1]
    keys = key[0].float().repeat_interleave(hq // h_kv, dim=0)  # [Hq, S, D]
    for first in range(0, c, QUERY_BLOCK):  # rows are independent: a block at a time bounds the memory
        queries = query[0, :, first:first + QUERY_BLOCK].float()
        logits = torch.einsum("hcd,hsd->hcs", queries, keys) * scaling
        if c > 1:
            last_seen = s - c + first + torch.arange(queries.shape[1], device=query.device)
            logits.masked_fill_(torch.arange(s, device=query.device)[None, :] > last_seen[:, None], float("-inf"))
        weighted = logits.softmax(dim=-1)[..., :p] * value_weights[:, None, :]  # [Hq, block, P]
        torch.maximum(importance, weighted.amax(dim=1).view(h_kv, -1, p).amax(dim=1), out=importance)


def utility_hook(importance: torch.Tensor, record: PrefillRecord, attention_only: bool = False) -> Callable:
    """A `recording` hook folding every recorded forward's attention into importance [L, H_kv, P]
    (`decode_importance` over the record's context, with its value-output weights and scalings; with
    `attention_only`, the attention weights alone, as KVzip scores)."""
    def hook(module, query, key, value, mask, scale):
        layer = _layer_index(module)
        weights = record.value_weights[layer]
        weights = torch.ones_like(weights) if attention_only else weights
        decode_importance(importance[layer], query, key, weights, record.scaling[layer])

    return hook


@dataclass
class OracleResult:
    importance: torch.Tensor  # I [L, H_kv, T_ctx]
    generated: torch.Tensor  # [steps] the sampled tokens fed as decode steps


@torch.no_grad()
def oracle_importance(model, record: PrefillRecord, question_ids: torch.Tensor, k_max: int = 64,
                      temperature: float = 0.7, seed: int = 0, eos_token_ids: tuple[int, ...] = (),
                      skip_layers: Collection[int] = ()) -> OracleResult:
    """I[l, g, j] = max over decode steps and group heads of A[l, h, k, j] * n[l, h, j] (full cache).

    The question is prefilled after the context (not recorded); then up to `k_max` tokens are sampled
    at `temperature` from a generator seeded with `seed`, and each one is fed as a single-token step
    whose attention is recorded. Sampling stops early at an EOS token (which is not fed).
    `skip_layers` (the head graph's excluded, sliding-window layers) are not measured and keep I = 0:
    they get no budget, and their sliding cache holds fewer keys than the context.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    question = _as_batch(question_ids, "question_ids")
    t_ctx, num_layers = record.context_len, record.num_layers
    device = record.k[0].device
    importance = torch.zeros(num_layers, record.num_kv_heads, t_ctx, device=device)
    cache = copy.deepcopy(record.cache)
    generator = torch.Generator().manual_seed(seed)  # sampling on the CPU: same tokens on every device

    def hook(module, query, key, value, mask, scale):
        layer = _layer_index(module)
        if query.shape[2] != 1 or layer in skip_layers:  # the question chunk is not a decode step
            return
        decode_importance(importance[layer], query, key, record.value_weights[layer], record.scaling[layer])

    generated = []
    position = t_ctx
    with recording(model, hook):
        logits = _forward(model, question.to(device), cache, position)
        position += question.shape[1]
        for _ in range(k_max):
            probs = (logits[0, -1].float().cpu() / temperature).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
            if token in eos_token_ids:
                break
            generated.append(token)
            logits = _forward(model, torch.tensor([[token]], device=device), cache, position)
            position += 1
    return OracleResult(importance.cpu(), torch.tensor(generated, dtype=torch.long))


def _forward(model, ids: torch.Tensor, cache, position: int) -> torch.Tensor:
    positions = torch.arange(position, position + ids.shape[1], device=ids.device)[None]
    return model(input_ids=ids, cache=cache, position_ids=positions, use_cache=True,
                 logits_to_keep=1).logits
