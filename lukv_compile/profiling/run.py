"""Offline LU-KV profiling: calibration context + questions -> oracle I -> loss curves -> Profile.

The context is prefilled once (that is where the time goes) and its q/k/v, scores and cache are
reused for every question; only the question and its sampled decode steps are run per question.
One length L calibrates on the text's first L tokens. Several (`context_tokens=[1024, 4096]`): the text
is cut at the longest; that length asks every question after all of it, each shorter one after the window
of that length holding the passage the question quotes (`calibration_windows`), so every question stays
answerable at every length. Each (window, question) is one sample of the average.
Per (context, question) the solver sweeps all 99 compression ratios over the model's head graph
(`head_graph`: sliding-window layers, which the cache leaves exact, get no budget and prune 0, so
compression rho removes rho of the compressed layers' tokens); the prune fractions are averaged over
questions, as the authors did. Under torchrun (WORLD_SIZE > 1) the questions are
sharded across ranks and the summed fractions all-reduced over gloo; every rank gets the result.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

from lukv_compile import solver
from lukv_compile.config import sliding_layers, text_config
from lukv_compile.models import eos_token_ids
from lukv_compile.policy.scorers import layer_ropes
from lukv_compile.profile import DEFAULT_SINK, DEFAULT_WINDOW, NUM_RATIOS, RECONSTRUCTION, Profile, check_ranking
from lukv_compile.profiling.curves import check_protection, cum_losses, eviction_order, layer_scores
from lukv_compile.profiling.oracle import PrefillRecord, oracle_importance, record_prefill
from lukv_compile.profiling.reconstruction import (
    PROFILE_POOL,
    REPEAT_REQUEST,
    chat_parts,
    check_pool,
    check_prompt_format,
    reconstruction_utility,
    request_ids,
)

RATIOS = np.arange(1, NUM_RATIOS + 1) / 100
TEMPERATURE = 0.7
SCOPES = ("global", "layer")
QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
CHAT_QUESTION = "chat template: the context opens the user's turn, the question ends it after a blank line"
CALIBRATION_NAME = "Northanger Abbey excerpt (lukv_compile/data/calibration_northanger.txt)"


def reconstruction_description(pool: int) -> str:
    """The calibration record's account of the reconstruction ranking the budgets were solved for."""
    return (f"the context, then '\\n\\n{REPEAT_REQUEST}', then the context again (teacher-forced); "
            + (f"utility max-pooled over {pool} tokens" if pool > 1 else "utility unpooled"))


# A calibration question that quotes a passage of the context with a name blanked out (the shipped set).
QUOTED_BLANK = re.compile(r'"([^"]*)____([^"]*)"')


@dataclass
class Calibration:
    context_ids: torch.Tensor  # [T] the calibration text
    question_ids: list[torch.Tensor]  # one [T_q] tensor per question
    name: str
    spans: list[tuple[int, int] | None]  # each question's quoted passage as a token range [a, b) of the context
    prefix_ids: torch.Tensor  # [P] what precedes every window of the text (the chat template's start; or empty)


@dataclass(frozen=True)
class Window:
    """A stretch of the calibration context and the questions asked after it."""

    start: int
    length: int
    questions: tuple[int, ...]


@dataclass
class ProfileResult:
    profile: Profile
    curves: np.ndarray | None  # [questions, L * H_kv, evictable + 1] when asked for, else None


def calibration_inputs(tokenizer, context: str | None = None, questions: Sequence[str] | None = None,
                       context_tokens: int = 4096, num_questions: int | None = None,
                       prompt_format: str = "plain") -> Calibration:
    """Tokenise the calibration context (first `context_tokens` tokens) and the first `num_questions` questions.

    plain: the text, then QUESTION_TEMPLATE; chat: as the evaluation prompts, the text opens the user's turn
    of the chat template and each question ends it (so the oracle answers as the chat model does).
    """
    from lukv_compile.data import calibration_questions, calibration_text

    name = CALIBRATION_NAME if context is None else "custom context"
    context = calibration_text() if context is None else context
    questions = [item["question"] for item in calibration_questions()] if questions is None else list(questions)
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    if num_questions is not None:
        if not 1 <= num_questions <= len(questions):
            raise ValueError(f"num_questions must be in 1..{len(questions)} (questions available), got {num_questions}")
        questions = questions[:num_questions]
    if not questions:
        raise ValueError("need at least one calibration question")
    check_prompt_format(prompt_format)
    chat = prompt_format == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template and this one has none; "
                         "use prompt format 'plain'")
    # Character offsets place each quoted passage; only fast tokenizers give them (else no question is placed).
    # In chat format the template's start brings the special tokens.
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(context, add_special_tokens=not chat, return_offsets_mapping=fast)
    context_ids = torch.tensor(encoded["input_ids"][:context_tokens], dtype=torch.long)
    offsets = encoded["offset_mapping"][:context_tokens] if fast else None
    asked = [chat_parts(tokenizer, q)[1] if chat else QUESTION_TEMPLATE.format(question=q) for q in questions]
    question_ids = [_ids(tokenizer, text) for text in asked]
    prefix_ids = _ids(tokenizer, chat_parts(tokenizer, "")[0] if chat else "")
    return Calibration(context_ids, question_ids, name, [quoted_span(q, context, offsets) for q in questions],
                       prefix_ids)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def quoted_span(question: str, context: str, offsets: Sequence[tuple[int, int]] | None) -> tuple[int, int] | None:
    """Token range [a, b) of the context passage `question` quotes with a blank ("... ____ ..."); None when
    the question quotes none, the passage is not inside the tokenised context, or there are no offsets."""
    quoted = offsets and QUOTED_BLANK.search(question)
    found = quoted and re.search(re.escape(quoted[1]) + r".{1,60}?" + re.escape(quoted[2]), context, flags=re.S)
    if not found:
        return None
    tokens = [i for i, (a, b) in enumerate(offsets) if a < found.end() and b > found.start()]
    return (tokens[0], tokens[-1] + 1) if tokens and offsets[-1][1] >= found.end() else None


def calibration_windows(calib: Calibration, lengths: Sequence[int]) -> list[Window]:
    """The (window, questions) pairs to profile: per length, the whole context when the length covers it;
    else each question after the window of a fixed grid (0, L, 2L, ...) holding its quoted passage, moved
    back just enough when the passage crosses the window's end."""
    t, everyone = calib.context_ids.numel(), tuple(range(len(calib.question_ids)))
    windows = []
    for length in sorted({min(length, t) for length in lengths}):  # lengths covering the context are one
        if length == t:
            windows.append(Window(0, t, everyone))
            continue
        unplaced = [i for i, span in enumerate(calib.spans) if span is None]
        if unplaced:
            raise ValueError(f"context length {length} is shorter than the {t}-token calibration context, so "
                             f"each question must quote a passage of it (\"... ____ ...\"); questions {unplaced} "
                             "do not, quote one outside it, or the tokenizer (not a fast one) gives no offsets")
        starts = defaultdict(list)
        for i, (a, b) in enumerate(calib.spans):
            start = min(a // length * length, t - length)
            starts[max(start, b - length)].append(i)
        windows += [Window(start, length, tuple(asked)) for start, asked in sorted(starts.items())]
    return windows


def min_keep(context_len: int, sink: int, window: int) -> int:
    """The paper's floor max(round(0.01 T), sink + window); at least one token so a head is never empty."""
    return max(round(0.01 * context_len), sink + window, 1)


def check_scope(scope: str, shards: int) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "layer" and shards > 1:
        raise ValueError(f"shards={shards} balances the whole model's budget: it needs scope 'global'")


def head_graph(config, shards: int = 1) -> nx.Graph:
    """The model's head graph; its excluded layers are the ones `LUKVCache` leaves exact (sliding-window)."""
    config = text_config(config)
    graph = solver.build_head_graph(config.num_hidden_layers, config.num_key_value_heads,
                                    config.num_attention_heads, excluded_layers=sliding_layers(config),
                                    shards=shards)
    if not solver.allocation_units(graph):
        raise ValueError("every layer of this model uses sliding-window attention, which LU-KV leaves exact: "
                         "there is nothing to profile")
    return graph


def prune_fractions(curves: np.ndarray, context_len: int, sink: int, window: int, graph: nx.Graph,
                    scope: str = "global") -> np.ndarray:
    """[99, L, H_kv] prune fractions of the whole context from one question's curves over unprotected tokens.

    curves [L * H_kv, E + 1] hold every KV head in (layer, head) order; only the graph's allocation
    units are solved (per shard balanced when it has shards), excluded layers get prune 0.
    The curves leave the P = sink + window protected tokens out, so compression rho of the whole
    context (keep (1 - rho) T per head on average) is compression rho T / E of the E = T - P
    evictable tokens, and evicting r_E of them prunes r_E E / T of the context.
    """
    check_scope(scope, graph.graph["shards"])
    evictable = check_protection(context_len, sink, window)
    floor = max(min_keep(context_len, sink, window) - (sink + window), 0)
    num_layers, num_kv_heads = graph.graph["num_layers"], graph.graph["num_kv_heads"]
    rows = solver.unit_attr(graph, "layer") * num_kv_heads + solver.unit_attr(graph, "kv_head")
    ratios = np.clip(RATIOS * context_len / evictable, 0.0, 1.0)
    if graph.graph["shards"] > 1:
        pruned = solver.sweep_balanced(graph, curves[rows], floor, ratios=ratios)
    else:
        layer_of_head = solver.unit_attr(graph, "layer") if scope == "layer" else None
        pruned = solver.sweep(curves[rows], floor, ratios=ratios, scope=scope, layer_of_head=layer_of_head)
    out = np.zeros((NUM_RATIOS, num_layers * num_kv_heads))
    out[:, rows] = pruned * evictable / context_len
    return out.reshape(NUM_RATIOS, num_layers, num_kv_heads)


def mean_fractions(total: np.ndarray, count: int) -> np.ndarray:
    """Average of `count` questions' prune fractions, as float32 strictly below 1 (Profile's range)."""
    return np.clip(total / count, 0.0, 1.0 - 1e-6).astype(np.float32)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the gloo process group torchrun set up when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def profile_scorers(model, tokenizer, scorers: Sequence[str], sink: int = DEFAULT_SINK, window: int | None = None,
                    k_max: int = 64, context: str | None = None, questions: Sequence[str] | None = None,
                    context_tokens: int | Sequence[int] = 4096, num_questions: int | None = None,
                    scope: str = "global", seed: int = 0, keep_curves: bool = False, progress: bool = True,
                    shards: int = 1, prompt_format: str = "plain", source: dict | None = None,
                    reconstruction_pool: int = PROFILE_POOL) -> dict[str, ProfileResult]:
    """One oracle run, one Profile per scorer (window None: each scorer's default window).

    context_tokens: one length, or several (module docstring); in chat format each window is preceded by the
    template's start, so a profiled context is that prefix + the window. shards > 1: tensor-parallel
    profile, every shard's kept tokens within 5% of the others'. prompt_format: `calibration_inputs`.
    source: extra provenance recorded in each profile's calibration record (e.g. the calibration files' names).
    reconstruction_pool: the pooling width of the reconstruction ranking the curves follow (run time pools
    over POOL tokens; the default, PROFILE_POOL = 1, solves the budgets for the unpooled ranking).
    """
    from lukv_compile.config import config_fingerprint, model_identity

    if not scorers or len(set(scorers)) != len(scorers):
        raise ValueError(f"scorers must be a non-empty list without repeats, got {list(scorers)}")
    windows = {s: DEFAULT_WINDOW[check_ranking(s)] if window is None else window for s in scorers}
    check_scope(scope, shards)
    check_pool(reconstruction_pool)
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    graph = head_graph(model.config, shards)
    excluded = graph.graph["excluded_layers"]
    lengths = [context_tokens] if isinstance(context_tokens, int) else list(context_tokens)
    if not lengths or min(lengths) < 1:
        raise ValueError(f"context_tokens must be lengths >= 1, got {context_tokens}")
    calib = calibration_inputs(tokenizer, context, questions, max(lengths), num_questions, prompt_format)
    parts = calibration_windows(calib, lengths)
    if keep_curves and len(parts) > 1:
        raise ValueError(f"keep_curves needs one context length covering the context, got {len(parts)} windows")
    prefix = calib.prefix_ids
    for part in parts:
        for s in scorers:
            check_protection(prefix.numel() + part.length, sink, windows[s])
    rank, world = init_distributed()

    sums = {s: np.zeros((NUM_RATIOS, graph.graph["num_layers"], graph.graph["num_kv_heads"])) for s in scorers}
    curves = {s: {} for s in scorers}
    steps = 0
    eos = eos_token_ids(model, tokenizer)
    samples = [(part, i) for part in parts for i in part.questions]
    mine = samples[rank::world]
    bar = tqdm(total=len(mine), desc="profiling questions", disable=not progress or rank != 0)
    for part in parts:
        asked = [i for p, i in mine if p is part]
        if not asked:
            continue
        text_ids = calib.context_ids[part.start:part.start + part.length]
        context_len = prefix.numel() + part.length
        record = record_prefill(model, torch.cat([prefix, text_ids]))
        orders = {s: eviction_order(calibration_ranking(s, model, tokenizer, record, text_ids, prompt_format,
                                                        reconstruction_pool), sink, windows[s]) for s in scorers}
        for i in asked:
            result = oracle_importance(model, record, calib.question_ids[i], k_max, TEMPERATURE, seed + i, eos,
                                       skip_layers=excluded)
            steps += result.generated.numel()
            for s in scorers:
                c = cum_losses(result.importance, orders[s])
                sums[s] += prune_fractions(c, context_len, sink, windows[s], graph, scope)
                if keep_curves:
                    curves[s][i] = c
            bar.update()
        del record
    bar.close()
    steps = _all_reduce(sums, steps, world)
    n = len(samples)
    description = json.dumps({
        "text": calib.name, "context_tokens": calib.context_ids.numel(), "questions": len(calib.question_ids),
        "k_max": k_max, "temperature": TEMPERATURE, "seed": seed, "mean_decode_steps": round(steps / n, 2),
        "prompt_format": prompt_format, "prefix_tokens": prefix.numel(),
        "question_template": CHAT_QUESTION if prompt_format == "chat" else QUESTION_TEMPLATE, "shards": shards,
    } | ({"context_lengths": sorted(set(lengths)), "windows": [[p.start, p.length, len(p.questions)] for p in parts]}
         if len(parts) > 1 else {})
      | ({"reconstruction": reconstruction_description(reconstruction_pool)} if RECONSTRUCTION in scorers else {})
      | (source or {}))
    identity, fingerprint = model_identity(model), config_fingerprint(model.config)
    results = {}
    for s in scorers:
        profile = Profile(mean_fractions(sums[s], n), scorer=s, sink=sink, window=windows[s], model=identity,
                          fingerprint=fingerprint, calibration=description, scope=scope, excluded_layers=excluded)
        gathered = _gather_curves(curves[s], world) if keep_curves else None
        stacked = None if gathered is None else np.stack([gathered[i] for i in sorted(gathered)])
        results[s] = ProfileResult(profile, stacked)
    return results


def calibration_ranking(name: str, model, tokenizer, record: PrefillRecord, text_ids: torch.Tensor,
                        prompt_format: str = "plain", reconstruction_pool: int = PROFILE_POOL) -> torch.Tensor:
    """Scores [L, H_kv, T] of ranking `name` on the recorded calibration context (T tokens, ending in the text
    `text_ids`).

    reconstruction: the recorded context followed by the request to repeat it (in the prompt format), with
    the text's own tokens teacher-forced as the answer.
    """
    if name == RECONSTRUCTION:
        special = set(tokenizer.all_special_ids)
        answer = [t for t in text_ids.tolist() if t not in special]
        return reconstruction_utility(model, record, request_ids(tokenizer, chat=prompt_format == "chat") + answer,
                                      reconstruction_pool)
    return layer_scores(name, record.q, record.k, record.v, record.scaling, layer_ropes(model.config))


def _all_reduce(sums: dict[str, np.ndarray], steps: int, world: int) -> int:
    """Sum the per-rank prune-fraction sums (in place) and decode-step counts over all ranks."""
    if world == 1:
        return steps
    import torch.distributed as dist

    for s, total in sums.items():
        tensor = torch.from_numpy(total)
        dist.all_reduce(tensor)
        sums[s] = tensor.numpy()
    count = torch.tensor([steps], dtype=torch.float64)
    dist.all_reduce(count)
    return int(count.item())


def _gather_curves(mine: dict[int, np.ndarray], world: int) -> dict[int, np.ndarray]:
    if world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {i: c for part in parts for i, c in part.items()}


def profile_model(model, tokenizer, scorer: str, sink: int = DEFAULT_SINK, window: int | None = None,
                  k_max: int = 64, questions: Sequence[str] | None = None, context: str | None = None,
                  scope: str = "global", progress: bool = True, **kwargs) -> Profile:
    """Profile one scorer (see `profile_scorers` for the remaining keyword arguments)."""
    return profile_scorers(model, tokenizer, [scorer], sink=sink, window=window, k_max=k_max, context=context,
                           questions=questions, scope=scope, progress=progress, **kwargs)[scorer].profile

