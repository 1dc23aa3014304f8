"""Inputs and comparisons the properties share: left-padded batches, greedy generations with their logits,
multi-turn conversations in transformers' idiom, and the tolerance a model's dtype allows."""

from __future__ import annotations

import torch

# Logit tolerance of "exact" per model dtype. The compiled model runs inductor's fused kernels, whose float sums go
# in another order than eager's: on SmolLM2 (30 layers, fp32) logits then differ by up to ~5e-4 from the plain
# model's with the same greedy tokens (a wrong token, mask or position moves them by far more).
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def left_padded_batch(lengths: list[int], vocab: int = 128, seed: int = 0, pad_token_id: int = 0):
    """input_ids and attention_mask for rows of the given real lengths, left-padded to the longest; token ids
    are drawn from [1, vocab)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, pad_token_id), mask


def generate_logits(model, ids, mask, steps, **kwargs):
    """(sequences, logits [B, steps, vocab], generate's output) of a greedy generate."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, output_logits=True,
                         return_dict_in_generate=True, **{"do_sample": False, **kwargs})
    return out.sequences, torch.stack(out.logits, dim=1), out


def assert_same_generation(got, want, tolerance: float = 1e-4) -> None:
    """Two `generate_logits` results agree: logits within `tolerance`, then the same tokens."""
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(got[0], want[0]), f"greedy tokens differ:\n{got[0].tolist()}\n{want[0].tolist()}"


def conversation(model, cache, lengths=(30,), turns=((11, 4), (7, 3), (19, 5)), vocab: int = 128, seed: int = 0):
    """Turns on one cache, transformers' idiom: each generate gets the whole history and its mask; each turn
    is (new user tokens after the previous answer, tokens to generate)."""
    ids, mask = left_padded_batch(list(lengths), vocab, seed)
    generations = []
    for turn, (new_tokens, steps) in enumerate(turns):
        generations.append(generate_logits(model, ids, mask, steps, cache=cache))
        said = torch.randint(1, vocab, (len(lengths), new_tokens), generator=torch.Generator().manual_seed(turn))
        ids = torch.cat([generations[-1][0], said], dim=1)
        mask = torch.cat([mask, torch.ones_like(ids[:, mask.shape[1]:])], dim=1)
    return generations


def assert_same_conversation(compiled, reference, lengths=(30,), turns=((11, 4), (7, 3), (19, 5)),
                             vocab: int = 128, seed: int = 0, tolerance: float = 1e-4, **lukv) -> None:
    """`conversation` through `compiled` on a compression-0 LUKVCache equals it on eager DynamicCache."""
    from transformers import DynamicCache

    from lukv_compile.runtime.cache import LUKVCache

    got = conversation(compiled, LUKVCache(reference.config, compression=0.0, **lukv), lengths, turns, vocab, seed)
    want = conversation(reference, DynamicCache(config=reference.config), lengths, turns, vocab, seed)
    for got_turn, want_turn in zip(got, want, strict=True):
        assert_same_generation(got_turn, want_turn, tolerance)
