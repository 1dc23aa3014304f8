"""The torch reference kernels (the CPU path and the Triton ground truth) against dense per-head math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lukv_compile.kernels.ops  # noqa: F401  (registers the lukv:: ops)
from lukv_compile.kernels import reference

GARBAGE = 50.0  # dead slots hold stale finite values; a kernel that reads one is off by about this much


def ragged_cache(lengths: torch.Tensor, room: int, head_dim: int, dtype: torch.dtype, seed: int,
                 tail: int = 2) -> dict[str, torch.Tensor]:
    """A layer's cache with segments of the given lengths [B, H], `room` free slots each, `tail` spare slots."""
    gen = torch.Generator().manual_seed(seed)
    b, h = lengths.shape
    cap = (lengths + room).flatten()
    slots = int(cap.sum()) + tail
    start = cap.cumsum(0) - cap
    owner = torch.full((slots,), b * h - 1, dtype=torch.int32)
    owner[: int(cap.sum())] = torch.repeat_interleave(torch.arange(b * h, dtype=torch.int32), cap)
    assert torch.equal(reference.slot_owners(start.view(b, h), slots), owner.long())
    live = reference.slot_is_live(owner.long(), start.view(b, h), lengths.int())
    keys = torch.where(live[:, None], torch.randn(slots, head_dim, generator=gen),
                       GARBAGE + torch.randn(slots, head_dim, generator=gen))
    values = torch.where(live[:, None], torch.randn(slots, head_dim, generator=gen),
                         GARBAGE + torch.randn(slots, head_dim, generator=gen))
    return dict(keys=keys.to(dtype), values=values.to(dtype), seg_start=start.view(b, h),
                seg_len=lengths.int(), seg_cap=cap.view(b, h).int())


def per_head_attention(q: torch.Tensor, cache: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The slow truth: SDPA over each KV head's gathered tokens, one query head at a time."""
    b, hq, _, d = q.shape
    h = cache["seg_start"].shape[1]
    out = torch.zeros(b, hq, 1, d)
    for row in range(b):
        for head in range(hq):
            kv = head // (hq // h)
            first, length = int(cache["seg_start"][row, kv]), int(cache["seg_len"][row, kv])
            if length == 0:
                continue
            k = cache["keys"][first: first + length].float()
            v = cache["values"][first: first + length].float()
            out[row, head] = F.scaled_dot_product_attention(q[row, head][None, None].float(), k[None, None],
                                                            v[None, None], scale=scale)[0, 0]
    return out


def decode_args(q: torch.Tensor, cache: dict[str, torch.Tensor]) -> tuple:
    return (q, cache["keys"], cache["values"], cache["seg_start"], cache["seg_len"])


heads_and_lengths = st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
    lambda bh: st.tuples(st.just(bh), st.lists(st.integers(0, 12), min_size=bh[0] * bh[1],
                                               max_size=bh[0] * bh[1])))


@settings(max_examples=40, deadline=None)
@given(heads_and_lengths, st.integers(1, 4), st.sampled_from([8, 16]), st.integers(0, 3), st.integers(0, 2**16))
def test_decode_attention_matches_per_head_sdpa(shape_lengths, group, head_dim, room, seed):
    (b, h), lengths = shape_lengths
    cache = ragged_cache(torch.tensor(lengths).view(b, h), room, head_dim, torch.float32, seed)
    q = torch.randn(b, h * group, 1, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    expected = per_head_attention(q, cache, 0.3)
    for kernel in (reference.decode_attention, reference.decode_attention_by_slot):
        out = kernel(*decode_args(q, cache), 0.3)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    dense = reference.decode_attention_dense(q, cache["keys"], cache["values"], cache["seg_start"],
                                             cache["seg_len"], 0.3)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_keeps_q_dtype_and_zeroes_empty_heads():
    cache = ragged_cache(torch.tensor([[0, 3]]), 1, 8, torch.bfloat16, 0)
    q = torch.randn(1, 4, 1, 8, dtype=torch.bfloat16)
    out = reference.decode_attention(*decode_args(q, cache), 0.5)
    assert out.dtype == torch.bfloat16
    assert bool((out[0, :2] == 0).all()) and bool((out[0, 2:] != 0).any())


def compacted_cache(selected: torch.Tensor, k: torch.Tensor, v: torch.Tensor, room: int, spare: int = 3):
    b, h, t, d = k.shape
    slots = int(selected.sum()) + room * b * h + spare
    state = dict(keys=torch.zeros(slots, d), values=torch.zeros(slots, d),
                 positions=torch.zeros(slots, dtype=torch.int32),
                 seg_start=torch.zeros(b, h, dtype=torch.int64), seg_len=torch.zeros(b, h, dtype=torch.int32),
                 seg_cap=torch.zeros(b, h, dtype=torch.int32))
    reference.compact_into_segments(selected, k, v, *state.values(), room)
    return state


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 20), st.integers(0, 3), st.floats(0.0, 1.0),
       st.integers(0, 2**16))
def test_compaction_puts_exactly_the_selected_tokens_in_their_slots(b, h, t, room, keep_share, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, b, h, t, 4, generator=gen)
    selected = torch.rand(b, h, t, generator=gen) < keep_share
    state = compacted_cache(selected, k, v, room)
    expected_start = 0
    for row in range(b):
        for head in range(h):
            kept = torch.nonzero(selected[row, head]).flatten()
            first = int(state["seg_start"][row, head])
            assert first == expected_start
            assert int(state["seg_len"][row, head]) == len(kept)
            assert int(state["seg_cap"][row, head]) == len(kept) + room
            segment = slice(first, first + len(kept))
            assert torch.equal(state["keys"][segment], k[row, head, kept])
            assert torch.equal(state["values"][segment], v[row, head, kept])
            assert torch.equal(state["positions"][segment], kept.int())
            assert bool((state["positions"][first + len(kept): first + len(kept) + room] == -1).all())
            owners = reference.slot_owners(state["seg_start"], state["keys"].shape[0])
            assert bool((owners[first: first + len(kept) + room] == row * h + head).all())
            expected_start += len(kept) + room
    assert bool((state["positions"][expected_start:] == -1).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 10), st.integers(1, 3),
       st.integers(0, 2**16))
def test_append_then_attend_sees_the_kept_tokens_and_the_new_one(b, h, group, t, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, b, h, t, 8, generator=gen)
    selected = torch.rand(b, h, t, generator=gen) < 0.5
    state = compacted_cache(selected, k, v, room=steps)
    seen = torch.tensor([t])
    k_new, v_new = torch.randn(2, steps, b, h, 1, 8, generator=gen)
    for step in range(steps):
        reference.check_room(state["seg_len"], state["seg_cap"])
        reference.append_kv(k_new[step], v_new[step], state["keys"], state["values"], state["positions"],
                            state["seg_start"], state["seg_len"], state["seg_cap"], seen)
    assert int(seen) == t + steps
    q = torch.randn(b, h * group, 1, 8, generator=gen)
    out = reference.decode_attention(*decode_args(q, state), 0.35)
    for row in range(b):
        for head in range(h * group):
            kv = head // group
            keys = torch.cat([k[row, kv, selected[row, kv]], k_new[:, row, kv, 0]])
            vals = torch.cat([v[row, kv, selected[row, kv]], v_new[:, row, kv, 0]])
            expected = F.scaled_dot_product_attention(q[row, head][None, None], keys[None, None],
                                                      vals[None, None], scale=0.35)
            torch.testing.assert_close(out[row, head], expected[0, 0], atol=1e-5, rtol=1e-5)
    first, length = int(state["seg_start"][0, 0]), int(state["seg_len"][0, 0])
    assert state["positions"][first + length - steps: first + length].tolist() == list(range(t, t + steps))


def small_layer(b: int = 1, h: int = 2, t: int = 6, d: int = 8, room: int = 2):
    slots = b * h * (t + room)
    return dict(keys=torch.zeros(slots, d), values=torch.zeros(slots, d),
                positions=torch.full((slots,), -1, dtype=torch.int32),
                seg_start=torch.zeros(b, h, dtype=torch.int64),
                seg_len=torch.zeros(b, h, dtype=torch.int32), seg_cap=torch.zeros(b, h, dtype=torch.int32),
                budget=torch.full((b, h), 3, dtype=torch.int32), seen=torch.zeros(1, dtype=torch.int64))


def test_opcheck_evict_prefill_append_and_decode():
    b, h, group, t, d, room = 1, 2, 2, 6, 8, 2
    q = torch.randn(b, h * group, t, d)
    k, v = torch.randn(2, b, h, t, d)
    layer = small_layer(b, h, t, d, room)
    torch.library.opcheck(torch.ops.lukv.evict_prefill.default,
                          (q, k, v, None, *layer.values(), "snapkv", 1, 1, False, room, d**-0.5))
    reference.evict_prefill(q, k, v, None, *layer.values(), "snapkv", 1, 1, False, room, d**-0.5)
    state = [layer[name] for name in ("keys", "values", "positions", "seg_start", "seg_len", "seg_cap", "seen")]
    k_new, v_new = torch.randn(2, b, h, 1, d)
    torch.library.opcheck(torch.ops.lukv.append_kv.default, (k_new, v_new, *state))
    q_new = torch.randn(b, h * group, 1, d)
    torch.library.opcheck(torch.ops.lukv.decode_attention.default,
                          (q_new, layer["keys"], layer["values"], layer["seg_start"],
                           layer["seg_len"], d**-0.5))
