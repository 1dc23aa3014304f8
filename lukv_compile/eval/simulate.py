"""The simulated engine: prefill a sample once, then let every method and ratio select from the same K/V.

The ragged cache is tested equal to a dense attention that masks, per KV head, exactly the tokens that
head evicted (tests/test_masked_simulation.py). This engine uses that equivalence to make a large grid
affordable: one recorded prefill per sample gives every layer's q/k/v; each (method, ratio) picks its kept
tokens with the runtime's own scorer, budgets and selection (`eviction.keep_mask`); then all of them
decode together as the rows of one batch, each row attending to the shared context through its own
per-head keep mask plus its own question and answer tokens. Rows leave the batch when they stop.

The `oracle` scorer ranks tokens by the oracle utility of the actual question (the profiler's
definition: attention x value-output norm, max over queries and the GQA group), recorded while the
full cache answers it: a query-aware ceiling for every budget allocation. The `reconstruction` scorer
ranks them by the utility of repeating the context (task-agnostic; lukv_compile/runtime/compress_context.py).

Two protocols: `agnostic` (LU-KV's: the context is compressed before the question is seen, which is
then one forward over the kept context) and `aware` (the question is part of the compressed prompt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lukv_compile.eval.methods import ORACLE, RECONSTRUCTED, Method
from lukv_compile.policy import scorers
from lukv_compile.policy.budgets import global_keep_counts, keep_counts
from lukv_compile.policy.eviction import keep_mask
from lukv_compile.profiling.curves import layer_scores
from lukv_compile.profiling.oracle import PrefillRecord, decode_importance, record_prefill, recording, utility_hook
from lukv_compile.profiling.reconstruction import context_utility
from lukv_compile.runtime.compress_context import GLOBAL_FLOOR

PROTOCOLS = ("agnostic", "aware")
SIMULATION_IMPL = "lukv_simulation"


@dataclass(frozen=True)
class Variant:
    method: Method
    compression: float


@dataclass(frozen=True)
class SampleAnswers:
    full: list[int]  # the full cache's greedy answer
    answers: list[list[int]]  # one per variant, same order
    kept: list[float]  # fraction of the prefilled tokens each variant keeps over all layers and heads


class SimulatedLayer:
    """One layer of the batched decode: the shared context K/V, each row's keep mask, each row's new K/V."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        self.context_keys, self.context_values = keys[0], values[0]  # [H, P, D], shared by every row
        self.keep = keep.transpose(0, 1).contiguous()  # [H, R, P] bool
        self.keys = self.values = None  # [R, H, n, D]: the tokens after the prompt

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keep = self.keep[:, rows]
        self.keys, self.values = self.keys[rows], self.values[rows]

    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [R, Hq, c, D] (the last c new tokens) -> [R, c, Hq, D]: kept context + new tokens, causal.

        The context part is one GEMM per KV head over all rows' queries (rows share the context K/V);
        the softmax runs over both parts without concatenating them.
        """
        r, hq, c, d = q.shape
        h, _, p = self.keep.shape
        g = hq // h * c  # a KV head's queries per row: its query heads x the chunk
        q = q.reshape(r, h, g, d) * scale
        context = (q.transpose(0, 1).reshape(h, r * g, d) @ self.context_keys.transpose(-1, -2)).view(h, r, g, p)
        context.masked_fill_(~self.keep[:, :, None, :], float("-inf"))
        new = (q @ self.keys.transpose(-1, -2)).transpose(0, 1)  # [H, R, G, n]
        n = self.keys.shape[2]
        query_pos = (n - c + torch.arange(c, device=q.device)).repeat(hq // h)
        new = new.masked_fill(torch.arange(n, device=q.device)[None, :] > query_pos[:, None], float("-inf"))
        top = torch.maximum(context.amax(dim=-1), new.amax(dim=-1))[..., None]
        context = context.sub_(top).exp_()
        new = new.sub_(top).exp_()
        total = context.sum(dim=-1, keepdim=True) + new.sum(dim=-1, keepdim=True)
        out = (context.view(h, r * g, p) @ self.context_values).view(h, r, g, d)
        out = (out + new @ self.values.transpose(0, 1)) / total  # [H, R, G, D]
        return out.transpose(0, 1).reshape(r, hq, c, d).transpose(1, 2).contiguous()


class SimulatedCache:
    """What a transformers decoder needs from a cache, over `SimulatedLayer`s (attention reads the layers)."""

    is_compileable = False

    def __init__(self, layers: list[SimulatedLayer], prompt_len: int) -> None:
        self.layers, self.prompt_len, self.new_tokens = layers, prompt_len, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.layers[layer_idx].append(key_states, value_states)
        if layer_idx == len(self.layers) - 1:
            self.new_tokens += key_states.shape[2]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prompt_len + self.new_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)


_active: SimulatedCache | None = None


def _simulated_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _active.layers[module.layer_idx].attend(query, scale), None


@contextlib.contextmanager
def simulating(model, cache: SimulatedCache) -> Iterator[None]:
    global _active
    from transformers import AttentionInterface

    # No mask function registered: transformers then builds no mask; the simulated attention makes its own.
    AttentionInterface.register(SIMULATION_IMPL, _simulated_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(SIMULATION_IMPL)
    _active = cache
    try:
        yield
    finally:
        _active = None
        model.set_attn_implementation(previous)


def variant_masks(variants: list[Variant], scores: dict[str, torch.Tensor], prompt_len: int) -> torch.Tensor:
    """[R, L, H, P] keep masks: each variant's budgets and scorer, selected like the runtime selects."""
    masks = []
    for variant in variants:
        m, s = variant.method, scores[variant.method.scorer]
        profile = m.profile
        budget = torch.as_tensor(keep_counts(profile, variant.compression, [prompt_len],
                                             profile.sink + profile.window)[0])  # [L, H]
        if m.selection in GLOBAL_FLOOR:
            budget = global_keep_counts(s, budget, profile.sink, profile.window, GLOBAL_FLOOR[m.selection])
        valid = torch.ones_like(s, dtype=torch.bool)
        masks.append(keep_mask(s, valid, budget, sink=profile.sink, window=profile.window, adaptive=m.adaptive))
    return torch.stack(masks)


@torch.no_grad()
def answer_with_oracle(model, record: PrefillRecord, question: list[int], protocol: str, stop_ids: set[int],
                       max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The full cache's greedy answer, and the oracle utility [L, H_kv, P] of the question and that answer."""
    prompt_len, device = record.context_len, record.k[0].device
    importance = torch.zeros(record.num_layers, record.num_kv_heads, prompt_len)

    if protocol == "aware":  # the question's own queries are in the prompt
        q_len = len(question)
        for layer in range(record.num_layers):
            decode_importance(importance[layer], record.q[layer][:, :, -q_len:], record.k[layer],
                              record.value_weights[layer], record.scaling[layer])
    cache = record.cache
    with recording(model, utility_hook(importance, record)):
        if protocol == "agnostic":
            ids = torch.tensor([question], device=device)
            logits = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[0, -1]
        else:
            logits = record.last_logits
        answer = []
        token = int(logits.argmax())
        while token not in stop_ids and len(answer) < max_new_tokens:
            answer.append(token)
            if len(answer) == max_new_tokens:
                break
            logits = model(input_ids=torch.tensor([[token]], device=device), cache=cache, logits_to_keep=1).logits
            token = int(logits[0, -1].argmax())
    return answer, importance


@torch.no_grad()
def simulate_sample(model, context_ids: list[int], question: list[int], variants: list[Variant], protocol: str,
                    stop_ids: set[int], max_new_tokens: int, reconstruction: list[int] | None = None) -> SampleAnswers:
    """Every variant's greedy answer to one sample, from one prefill (see the module docstring).

    reconstruction: the context's reconstruction ids (`reconstruction.repeat_ids`), needed by that scorer.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    reconstructed = {v.method.scorer for v in variants} & set(RECONSTRUCTED)
    if reconstructed and (protocol != "agnostic" or not reconstruction):
        raise ValueError("the reconstruction and kvzip scorings need the agnostic protocol and the reconstruction "
                         "token ids")
    prompt = context_ids + question if protocol == "aware" else context_ids
    record = record_prefill(model, torch.tensor([prompt]))
    scores = {s: context_utility(model, record, reconstruction, s) for s in reconstructed}
    full, importance = answer_with_oracle(model, record, question, protocol, stop_ids, max_new_tokens)
    if not variants:
        return SampleAnswers(full, [], [])
    ropes = scorers.layer_ropes(model.config)
    ranked = {v.method.scorer for v in variants} - {ORACLE, *RECONSTRUCTED}
    scores |= {s: layer_scores(s, record.q, record.k, record.v, record.scaling, ropes) for s in ranked}
    scores[ORACLE] = importance
    keep = variant_masks(variants, scores, len(prompt))  # [R, L, H, P]
    kept = keep.flatten(1).float().mean(dim=1).tolist()
    layers = [SimulatedLayer(record.k[i], record.v[i], keep[:, i]) for i in range(record.num_layers)]
    del record, scores
    answers = batched_greedy(model, SimulatedCache(layers, len(prompt)), question if protocol == "agnostic" else None,
                             full[:1], len(variants), stop_ids, max_new_tokens)
    return SampleAnswers(full, answers, kept)


def batched_greedy(model, cache: SimulatedCache, question: list[int] | None, first: list[int], rows: int,
                   stop_ids: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers of `rows` rows; the question is fed first (agnostic), or every row starts from `first`."""
    device = model.device
    answers: list[list[int]] = [[] for _ in range(rows)]
    alive = list(range(rows))
    with simulating(model, cache):
        if question is None:  # aware: every row starts from the exact prompt's next token
            tokens = first * rows
        else:
            ids = torch.tensor([question], device=device).expand(rows, -1)
            tokens = [int(t) for t in model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)]
        while alive:
            still = []
            for row, token in zip(alive, tokens, strict=True):
                if token in stop_ids or len(answers[row]) >= max_new_tokens:
                    continue
                answers[row].append(token)
                if len(answers[row]) < max_new_tokens:
                    still.append((row, token))
            if not still:
                break
            if len(still) < len(alive):
                index = {row: i for i, row in enumerate(alive)}
                cache.keep_rows(torch.tensor([index[row] for row, _ in still], device=device))
            alive = [row for row, _ in still]
            ids = torch.tensor([[token] for _, token in still], device=device)
            tokens = [int(t) for t in model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)]
    return answers

