"""The reconstruction ranking: a context token's utility to the model repeating the context.

A scorer that sees only the context cannot know which fact a later question will ask for; the oracle
(the utility of the actual question) can. This ranks every context token instead by the oracle utility
of a self-supervised question: the model is asked to repeat the context and the context is teacher-forced
as its answer (KVzip's idea, Kim et al. 2025); a token's score is the profiler's utility (attention x
value-output norm, max over the reconstruction's queries and the GQA group, `oracle.decode_importance`),
max-pooled along the context over POOL tokens as SnapKV pools attention: a kept token keeps its
neighbours' chance too, so a fact survives whole (a passkey's digits are one token each) rather than as
the few tokens the repetition happened to read hardest.

KVzip's own score of the same reconstruction (`kvzip`) is the largest attention weight alone, unpooled;
`kvzip_pooled` is that score max-pooled over POOL tokens as ours is. `context_utility` gives any of them.

It needs a second forward over the full context, so it is no run-time scorer: the profiler ranks the
calibration context with it (`lukv profile --scorer reconstruction`), `compress_context`
(lukv_compile/runtime/compress_context.py) fills a cache with it (or with KVzip's score), and the evaluation's
simulated engine selects with either.
"""

from __future__ import annotations

import copy

import torch

from lukv_compile.policy.scorers.snapkv import pool_prefix
from lukv_compile.profile import RECONSTRUCTION
from lukv_compile.profiling.oracle import PrefillRecord, recording, utility_hook

POOL = 7  # tokens: SnapKV's published pooling width, not tuned on the evaluation
# The ranking the profiler solves budgets for. Unpooled: on SmolLM2 the budgets solved for the unpooled
# ranking served the pooled run-time ranking better than budgets solved for the pooled one (docs/results.md).
PROFILE_POOL = 1

KVZIP = "kvzip"
KVZIP_POOLED = "kvzip_pooled"
# What compress_context can rank the context by: scoring -> (pooling width, attention weight alone).
SCORING_FORM = {RECONSTRUCTION: (POOL, False), KVZIP: (1, True), KVZIP_POOLED: (POOL, True)}
SCORINGS = tuple(SCORING_FORM)

REPEAT_REQUEST = "Repeat the text above exactly."
PROMPT_FORMATS = ("chat", "plain")
_MARK = "\x00context\x00"


def check_pool(pool: int) -> None:
    """The pooling width is centred on each token, so it must be odd (1: unpooled)."""
    if not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"the reconstruction pooling width must be an odd integer >= 1 (1: unpooled), got {pool!r}")


def check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown context scoring {scoring!r}; allowed: {', '.join(SCORINGS)}")


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")


def chat_parts(tokenizer, text: str) -> tuple[str, str]:
    """The chat template around a user message of a context then `text`: (before the context, after it).

    The context starts the user's message; `text` (after a blank line) ends it, then the assistant's turn
    starts, so the second part is what follows the context.
    """
    template = tokenizer.apply_chat_template([{"role": "user", "content": f"{_MARK}\n\n{text}"}], tokenize=False,
                                             add_generation_prompt=True)
    before, after = template.split(_MARK)
    return before, after


def next_turn(tokenizer, text: str) -> str:
    """What follows an assistant's answer when the user then says `text`: the end of the assistant's turn, the
    user's turn, and the start of the next assistant turn."""
    said = [{"role": "user", "content": "A question"}, {"role": "assistant", "content": _MARK}]
    template = tokenizer.apply_chat_template(said + [{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return template.split(_MARK)[1]


def request_ids(tokenizer, chat: bool = True) -> list[int]:
    """Token ids of the repeat request that follows the context (closing the user's turn when `chat`)."""
    request = chat_parts(tokenizer, REPEAT_REQUEST)[1] if chat else f"\n\n{REPEAT_REQUEST}"
    return tokenizer.encode(request, add_special_tokens=False)


def repeat_ids(tokenizer, context_text: str, chat: bool = True) -> list[int]:
    """Token ids of the reconstruction: the repeat request after the context, then the context's text."""
    return request_ids(tokenizer, chat) + tokenizer.encode(context_text, add_special_tokens=False)


@torch.no_grad()
def reconstruction_utility(model, record: PrefillRecord, reconstruction: list[int], pool: int = POOL,
                           attention_only: bool = False) -> torch.Tensor:
    """[L, H_kv, P] float32: the oracle utility of `reconstruction` over the recorded context (its cache is
    copied), max-pooled over `pool` neighbouring tokens (1: unpooled). attention_only: KVzip's score, the largest
    attention weight any reconstruction query of the GQA group gives the token (no value-output norm)."""
    check_pool(pool)
    if not reconstruction:
        raise ValueError("the reconstruction token ids are empty")
    importance = torch.zeros(record.num_layers, record.num_kv_heads, record.context_len, device=record.k[0].device)

    cache = copy.deepcopy(record.cache)
    with recording(model, utility_hook(importance, record, attention_only)):
        model(input_ids=torch.tensor([reconstruction], device=record.k[0].device), cache=cache, logits_to_keep=1)
    return pool_prefix(importance, 0, pool)


def context_utility(model, record: PrefillRecord, reconstruction: list[int], scoring: str) -> torch.Tensor:
    """[L, H_kv, P] scores of the recorded context by `scoring`: `reconstruction` (utility, pooled over POOL),
    `kvzip` (KVzip's: the attention weight alone, unpooled) or `kvzip_pooled` (that weight pooled over POOL)."""
    check_scoring(scoring)
    pool, attention_only = SCORING_FORM[scoring]
    return reconstruction_utility(model, record, reconstruction, pool=pool, attention_only=attention_only)
