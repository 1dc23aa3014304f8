"""Many questions over one compressed context in one batched generate.

    batch = cache.fork(len(questions))  # each row continues from the one compressed context
    inputs = questions_batch(context_ids, questions, tokenizer.pad_token_id)
    compiled.generate(**inputs, cache=batch, max_new_tokens=...)

Row i is the context's ids, then left padding, then question i. The padding sits between the context and
the question: the cache never stores it and transformers computes position ids from the mask, so each row's
question and answer get the positions they have when asked alone, and each row equals asking its question
alone on its own fork.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def questions_batch(context_ids: torch.Tensor | Sequence[int], questions: Sequence[torch.Tensor | Sequence[int]],
                    pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` [N, T + longest question] for a generate on `cache.fork(N)` (see above).

    context_ids: the ids the cache holds ([T] or [1, T], e.g. a loaded cache's `token_ids`); questions: N
    sequences of ids (at least one token each).
    """
    context = torch.as_tensor(context_ids).long()
    if context.dim() == 2 and context.shape[0] == 1:
        context = context[0]
    if context.dim() != 1 or context.numel() == 0:
        raise ValueError(f"context_ids must be one non-empty sequence ([T] or [1, T]), got shape "
                         f"{tuple(context.shape)}")
    asked = [torch.as_tensor(q).long().reshape(-1) for q in questions]
    if not asked or any(q.numel() == 0 for q in asked):
        raise ValueError("questions must be one or more sequences of at least one token id each")
    width = max(q.numel() for q in asked)
    ids = torch.full((len(asked), context.numel() + width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :context.numel()], mask[:, :context.numel()] = context, 1
    for row, question in enumerate(asked):
        ids[row, ids.shape[1] - question.numel():] = question
        mask[row, ids.shape[1] - question.numel():] = 1
    return {"input_ids": ids, "attention_mask": mask}
