"""The ragged storage and the CPU kernels (the Triton ground truth) against plain per-head Python models.

`HeadModel` is the truth for a `RaggedStore`: per (batch row, KV head) a Python list of the tokens that
head holds, in order. Every storage operation is mirrored on it and the store is checked against it
token by token (exactly), along with the layout invariants.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lukv_compile.kernels.reference import segment_attention
from lukv_compile.policy import scorers
from lukv_compile.policy.budgets import adaptive_keep
from lukv_compile.policy.eviction import Candidates, evict
from lukv_compile.policy.scorers import SCORERS, Rope
from lukv_compile.policy.selection import protect_and_mask, select_tokens
from lukv_compile.runtime.storage import MIN_ROOM, RaggedStore, room_for, segment_slots

GARBAGE = 50.0  # free slots get stale finite values; a kernel that reads one is off by about this much
ROPE = Rope.from_theta(8, 10000.0)  # every scorer test here uses head_dim 8; expected_attention needs RoPE
EXAMPLES = settings(max_examples=40, deadline=None)


class HeadModel:
    """The tokens (key, value, position) of every (row, head), as Python lists in sequence order."""

    def __init__(self, batch: int, heads: int):
        self.tokens = [[[] for _ in range(heads)] for _ in range(batch)]

    @property
    def batch(self) -> int:
        return len(self.tokens)

    def append(self, k: torch.Tensor, v: torch.Tensor, counts: np.ndarray, first_position: int,
               dtype: torch.dtype) -> None:
        c = k.shape[2]
        for row, heads in enumerate(self.tokens):
            for head, held in enumerate(heads):
                for i in range(c - int(counts[row]), c):
                    held.append((k[row, head, i].to(dtype), v[row, head, i].to(dtype), first_position + i))

    def keep(self, kept_positions: list[list[set[int]]]) -> None:
        self.tokens = [[[tok for tok in held if tok[2] in kept_positions[row][head]]
                        for head, held in enumerate(heads)] for row, heads in enumerate(self.tokens)]

    def select_rows(self, rows: np.ndarray) -> None:
        self.tokens = [[list(held) for held in self.tokens[int(r)]] for r in rows]

    def lengths(self) -> np.ndarray:
        return np.array([[len(held) for held in heads] for heads in self.tokens], dtype=np.int64)


def stack(held: list, index: int, like: torch.Tensor) -> torch.Tensor:
    if not held:
        return like.new_zeros((0, *like.shape[1:]))
    return torch.stack([tok[index] for tok in held])


def head_tokens(store: RaggedStore, row: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, n = int(store.start[row, head]), int(store.length[row, head])
    return store.keys[s:s + n], store.values[s:s + n], store.positions[s:s + n]


def check_store(store: RaggedStore, model: HeadModel) -> None:
    """Every invariant of the layout, and every head's tokens exactly those of the model."""
    b, h = model.batch, store.heads
    assert store.batch == b
    for meta in (store.start, store.length, store.cap):
        assert isinstance(meta, np.ndarray) and meta.shape == (b, h) and meta.dtype == np.int64
    slots = store.keys.shape[0]
    assert store.keys.shape == store.values.shape == (slots, store.head_dim)
    assert store.positions.shape == (slots,) and store.positions.dtype == torch.int32
    assert np.array_equal(store.length, model.lengths())
    assert (store.cap >= store.length).all() and (store.length >= 0).all()
    assert store.num_tokens == int(model.lengths().sum())
    # Segments tile the storage without overlap (nothing is reserved beyond the heads' capacities).
    order = np.argsort(store.start.reshape(-1), kind="stable")
    starts, caps = store.start.reshape(-1)[order], store.cap.reshape(-1)[order]
    assert (starts >= 0).all() and (starts + caps <= slots).all()
    assert (starts[1:] >= starts[:-1] + caps[:-1]).all()
    assert int(store.cap.sum()) == slots
    tensors = (store.keys, store.values, store.positions)
    metadata = sum(a.nbytes for a in (store.start, store.length, store.cap, store.prefix_start, store.prefix_length))
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in tensors) + metadata
    dev_start, dev_length = store.device_metadata()
    assert np.array_equal(dev_start.cpu().numpy(), store.start)
    assert np.array_equal(dev_length.cpu().numpy(), store.length)
    for row in range(b):
        for head in range(h):
            held = model.tokens[row][head]
            keys, values, positions = head_tokens(store, row, head)
            assert torch.equal(keys, stack(held, 0, store.keys))
            assert torch.equal(values, stack(held, 1, store.values))
            assert positions.tolist() == [tok[2] for tok in held]
            assert torch.equal(store.head_positions(row, head), positions)
            s, n, cap = int(store.start[row, head]), int(store.length[row, head]), int(store.cap[row, head])
            assert bool((store.positions[s + n:s + cap] == -1).all())  # free slots hold no position
    check_dense(store, model)


def check_dense(store: RaggedStore, model: HeadModel) -> None:
    keys, values, positions, valid = store.dense()
    b, h = store.length.shape
    t = int(store.length.max()) if store.length.size else 0
    assert keys.shape == values.shape == (b, h, t, store.head_dim)
    assert positions.shape == valid.shape == (b, h, t) and valid.dtype == torch.bool
    assert keys.dtype == store.keys.dtype and positions.dtype == store.positions.dtype
    for row in range(b):
        for head in range(h):
            held = model.tokens[row][head]
            n = len(held)
            assert valid[row, head].tolist() == [False] * (t - n) + [True] * n  # right-aligned
            assert torch.equal(keys[row, head, t - n:], stack(held, 0, store.keys))
            assert torch.equal(values[row, head, t - n:], stack(held, 1, store.values))
            assert positions[row, head].tolist() == [-1] * (t - n) + [tok[2] for tok in held]
            assert bool((keys[row, head, :t - n] == 0).all()) and bool((values[row, head, :t - n] == 0).all())


def fill_free_slots(store: RaggedStore, value: float = GARBAGE) -> None:
    """Stale values in every free slot: a kernel that reads past a head's length sees them."""
    for row in range(store.batch):
        for head in range(store.heads):
            s, n, cap = int(store.start[row, head]), int(store.length[row, head]), int(store.cap[row, head])
            store.keys[s + n:s + cap] = value
            store.values[s + n:s + cap] = -value


class Builder:
    """A store and its model driven together, drawing random operations from hypothesis."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int):
        self.store = RaggedStore(batch, heads, head_dim, dtype, torch.device("cpu"))
        self.model = HeadModel(batch, heads)
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0  # positions consumed, padding included (as the cache counts them)
        self.dtype = dtype

    def chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.model.batch, self.store.heads, c, self.store.head_dim)
        return torch.randn(shape, generator=self.gen), torch.randn(shape, generator=self.gen)

    def append(self, c: int, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.chunk(c)
        self.store.append(k, v, counts, self.seen)
        self.model.append(k, v, counts, self.seen, self.dtype)
        self.seen += c
        return k, v

    def keep_random(self, share: float) -> None:
        """Keep a random subset of the held tokens (`replace` with dense candidates)."""
        keys, values, positions, valid = self.store.dense()
        selected = valid & (torch.rand(valid.shape, generator=self.gen) < share)
        self.store.replace(selected, keys, values, positions)
        self.model.keep(kept_sets(positions, selected))

    def keep_counts(self, lengths: np.ndarray) -> None:
        """Keep exactly lengths[b, h] randomly chosen tokens of each head."""
        keys, values, positions, valid = self.store.dense()
        noise = torch.rand(valid.shape, generator=self.gen).masked_fill(~valid, -1.0)
        selected = select_tokens(noise, torch.as_tensor(lengths))
        self.store.replace(selected, keys, values, positions)
        self.model.keep(kept_sets(positions, selected))

    def select_rows(self, rows: np.ndarray) -> None:
        self.store.select_rows(rows)
        self.model.select_rows(rows)


def kept_sets(positions: torch.Tensor, selected: torch.Tensor) -> list[list[set[int]]]:
    return [[set(positions[row, head][selected[row, head]].tolist()) for head in range(positions.shape[1])]
            for row in range(positions.shape[0])]


def draw_counts(data, batch: int, c: int) -> np.ndarray:
    return np.array(data.draw(st.lists(st.integers(0, c), min_size=batch, max_size=batch)), dtype=np.int64)


# ---- storage helpers


def test_segment_slots_lists_every_held_slot_head_after_head():
    start, length = np.array([[0, 10], [20, 5]]), np.array([[2, 3], [0, 1]])
    assert segment_slots(start, length).tolist() == [0, 1, 10, 11, 12, 5]
    assert segment_slots(start, np.zeros_like(length)).tolist() == []
    assert segment_slots(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64)).tolist() == []


def test_room_for_is_a_floor_or_a_share_of_the_length():
    assert room_for(np.array([0, 1, MIN_ROOM * 16, 10_000])).tolist() == [MIN_ROOM, MIN_ROOM, MIN_ROOM, 625]


# ---- RaggedStore properties


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**16), st.data())
def test_store_holds_exactly_what_each_head_was_given(batch, heads, dtype, seed, data):
    builder = Builder(batch, heads, 4, dtype, seed)
    check_store(builder.store, builder.model)
    assert builder.store.nbytes() == 5 * batch * heads * 8  # nothing reserved up front: metadata alone
    for _ in range(data.draw(st.integers(1, 8), label="operations")):
        op = data.draw(st.sampled_from(["append", "append", "append", "long_append", "replace", "keep_counts",
                                        "select_rows"]), label="op")
        b = builder.model.batch
        if op in ("append", "long_append"):
            c = data.draw(st.integers(1, 4) if op == "append" else st.integers(MIN_ROOM, 3 * MIN_ROOM), label="c")
            builder.append(c, draw_counts(data, b, c))
        elif op == "replace":
            builder.keep_random(data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label="share"))
            # Eviction rebuilds at exactly the kept tokens plus room: the evicted tokens' memory is gone.
            assert np.array_equal(builder.store.cap, builder.store.length + room_for(builder.store.length))
        elif op == "keep_counts":
            most = builder.store.length
            builder.keep_counts(np.array([[data.draw(st.integers(0, int(n))) for n in row] for row in most]))
        else:
            rows = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=3), label="rows")
            builder.select_rows(np.array(rows, dtype=np.int64))
        check_store(builder.store, builder.model)


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 20), st.integers(0, 2**16), st.data())
def test_replace_from_a_chunk_keeps_exactly_the_selected_chunk_tokens(batch, heads, c, seed, data):
    """The prompt's eviction: an empty store takes the selected tokens of the chunk's candidates."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, batch, heads, c, 8, generator=gen)
    counts, first = draw_counts(data, batch, c), data.draw(st.integers(0, 50))
    cand = Candidates.from_chunk(k, v, counts, first)
    assert cand.valid.shape == cand.positions.shape == (batch, heads, c)
    assert cand.positions[0, 0].tolist() == list(range(first, first + c))
    selected = cand.valid & (torch.rand(batch, heads, c, generator=gen) < 0.5)
    store = RaggedStore(batch, heads, 8, torch.float32, torch.device("cpu"))
    store.replace(selected, cand.keys, cand.values, cand.positions)
    model = HeadModel(batch, heads)
    model.append(k, v, counts, first, torch.float32)
    model.keep(kept_sets(cand.positions, selected))
    check_store(store, model)
    assert all(len(held) <= int(counts[row]) for row, heads_ in enumerate(model.tokens) for held in heads_)


def test_growth_is_amortised_and_reserves_nothing_up_front():
    store = RaggedStore(1, 2, 4, torch.float32, torch.device("cpu"))
    assert store.keys.shape[0] == 0 and store.num_tokens == 0
    one = np.ones(1, dtype=np.int64)
    store.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), one, 0)
    assert store.cap.tolist() == [[1 + MIN_ROOM, 1 + MIN_ROOM]]
    layouts, cap = 1, store.cap.copy()
    for step in range(1, 2000):
        store.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), one, step)
        if not np.array_equal(store.cap, cap):
            layouts, cap = layouts + 1, store.cap.copy()
            assert np.array_equal(cap, store.length + room_for(store.length))
    assert store.length.tolist() == [[2000, 2000]]
    assert layouts <= 60, f"{layouts} re-layouts for 2000 single-token appends: growth is not amortised"
    assert store.head_positions(0, 1).tolist() == list(range(2000))


def test_heads_short_of_room_share_a_re_layout():
    """Heads of different lengths decoding together: when one overflows, every head short of half its room
    is laid out again in the same copy, so a layer is copied about as often as a single head would be."""
    store = RaggedStore(1, 3, 4, torch.float32, torch.device("cpu"))
    store.append(*torch.randn(2, 1, 3, 40, 4), np.array([40]), 0)
    store.replace(torch.arange(40).expand(1, 3, 40) < torch.tensor([5, 20, 40])[None, :, None], *store.dense()[:3])
    one = np.ones(1, dtype=np.int64)
    layouts, cap = 0, store.cap.copy()
    for step in range(40, 40 + 16 * 20):
        store.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), one, step)
        if not np.array_equal(store.cap, cap):
            layouts, cap = layouts + 1, store.cap.copy()
            free = store.cap - store.length
            assert (free >= room_for(store.length) // 2).all(), f"a head left with {free.min()} free slots"
    assert store.length.tolist() == [[325, 340, 360]]
    assert layouts <= 22, f"{layouts} re-layouts for 320 steps of 3 heads (one head alone needs ~20)"

def test_a_row_with_no_real_tokens_is_left_alone():
    store = RaggedStore(2, 1, 4, torch.float32, torch.device("cpu"))
    k = torch.randn(2, 1, 3, 4)
    store.append(k, k, np.array([3, 0]), 10)
    assert store.length.tolist() == [[3], [0]]
    assert store.head_positions(0, 0).tolist() == [10, 11, 12] and store.head_positions(1, 0).tolist() == []


# ---- segment attention


def dense_truth(q: torch.Tensor, model: HeadModel, counts: np.ndarray, scale: float) -> torch.Tensor:
    """Per query head, float64 softmax attention over its KV head's tokens with an explicit causal mask."""
    b, hq, c, d = q.shape
    h = len(model.tokens[0])
    group = hq // h
    out = torch.zeros(b, hq, c, d, dtype=torch.float64)
    for row in range(b):
        real = int(counts[row])
        for qh in range(hq):
            held = model.tokens[row][qh // group]
            n = len(held)
            if real == 0 or n == 0:
                continue
            keys = torch.stack([tok[0] for tok in held]).double()
            values = torch.stack([tok[1] for tok in held]).double()
            queries = q[row, qh, c - real:].double()  # [real, D]
            logits = queries @ keys.T * scale
            causal = torch.arange(n)[None, :] <= (n - real + torch.arange(real))[:, None]
            out[row, qh, c - real:] = logits.masked_fill(~causal, -math.inf).softmax(dim=-1) @ values
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.sampled_from([8, 16]),
       st.integers(0, 2**16), st.data())
def test_segment_attention_matches_dense_per_head_attention(batch, heads, group, c, head_dim, seed, data):
    builder = Builder(batch, heads, head_dim, torch.float32, seed)
    prompt = data.draw(st.integers(0, 40), label="prompt")
    if prompt:
        builder.append(prompt, draw_counts(data, batch, prompt))
        builder.keep_random(data.draw(st.sampled_from([0.2, 0.6, 1.0]), label="share"))  # uneven heads
    counts = draw_counts(data, batch, c)
    builder.append(c, counts)
    fill_free_slots(builder.store)
    store = builder.store
    q = torch.randn(batch, heads * group, c, head_dim, generator=builder.gen)
    scale = data.draw(st.sampled_from([head_dim**-0.5, 0.7]), label="scale")
    out = segment_attention(q, store.keys, store.values, store.start, store.length, counts, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), dense_truth(q, builder.model, counts, scale), atol=1e-5, rtol=1e-5)
    padding = torch.as_tensor(np.arange(c)[None, :] < (c - counts)[:, None])  # [B, C]
    assert bool((out.permute(0, 2, 1, 3)[padding] == 0).all())


def test_segment_attention_over_a_whole_prompt_is_causal_sdpa():
    """Nothing evicted: the ragged path is the model's own attention (left padding included)."""
    gen = torch.Generator().manual_seed(0)
    b, h, group, c, d = 2, 2, 3, 9, 16
    store = RaggedStore(b, h, d, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, b, h, c, d, generator=gen)
    q = torch.randn(b, h * group, c, d, generator=gen)
    counts = np.array([9, 6])
    store.append(k, v, counts, 0)
    out = segment_attention(q, store.keys, store.values, store.start, store.length, counts, d**-0.5)
    causal = torch.ones(c, c, dtype=torch.bool).tril()
    real = torch.as_tensor(np.arange(c)[None, :] >= (c - counts)[:, None])
    mask = causal[None, None] & real[:, None, None, :]  # [B, 1, C, C]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=True)
    expected[1, :, :3] = 0  # padding queries
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_segment_attention_keeps_q_dtype_and_zeroes_empty_heads():
    store = RaggedStore(1, 2, 8, torch.float32, torch.device("cpu"))
    k = torch.randn(1, 2, 3, 8)
    store.append(k, k, np.array([3]), 0)
    store.replace(torch.tensor([[[False] * 3, [True] * 3]]), *store.dense()[:3])
    q = torch.randn(1, 4, 1, 8, dtype=torch.bfloat16)
    out = segment_attention(q, store.keys, store.values, store.start, store.length, np.array([1]), 0.5)
    assert out.dtype == torch.bfloat16
    assert bool((out[0, :2] == 0).all()) and bool((out[0, 2:] != 0).any())
    expected = segment_attention(q.float(), store.keys, store.values, store.start, store.length, np.array([1]), 0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


# ---- selection


def test_protect_and_mask_protects_each_heads_own_first_and_last_tokens():
    valid = torch.tensor([[[False, False, True, True, True, True, True],
                           [True, False, True, True, False, True, False]]])
    scores = torch.arange(14, dtype=torch.bfloat16).view(1, 2, 7)
    out = protect_and_mask(scores, valid, sink=1, window=2)
    inf = math.inf
    assert out.dtype == torch.float32
    assert out[0, 0].tolist() == [-inf, -inf, inf, 3.0, 4.0, inf, inf]
    assert out[0, 1].tolist() == [inf, -inf, 9.0, inf, -inf, inf, -inf]
    assert protect_and_mask(scores, valid, 0, 0)[0, 0].tolist() == [-inf, -inf, 2.0, 3.0, 4.0, 5.0, 6.0]
    everything = protect_and_mask(scores, valid, 3, 3)
    assert torch.equal(everything == inf, valid) and torch.equal(everything == -inf, ~valid)


def test_protect_and_mask_handles_empty_heads():
    valid = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert bool((protect_and_mask(torch.zeros(1, 1, 4), valid, 2, 2) == -math.inf).all())


def test_select_tokens_takes_the_top_keep_with_ties_to_the_earlier_token():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]]])
    chosen = select_tokens(scores, torch.tensor([[2, 0]]))
    assert chosen.dtype == torch.bool
    assert chosen.tolist() == [[[False, True, True, False, False], [False] * 5]]
    assert select_tokens(scores, torch.tensor([[5, 1]])).tolist() == [[[True] * 5, [True] + [False] * 4]]


@EXAMPLES
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 30), st.integers(0, 2**16), st.data())
def test_select_tokens_property(b, h, t, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (b, h, t), generator=gen).float()  # many ties
    keep = torch.randint(0, t + 1, (b, h), generator=gen)
    chosen = select_tokens(scores, keep)
    assert torch.equal(chosen.sum(dim=-1), keep)
    for row in range(b):
        for head in range(h):
            s, sel = scores[row, head], chosen[row, head]
            if sel.any() and (~sel).any():
                assert s[sel].min() >= s[~sel].max()
                tie = s[sel].min()
                # Among equal scores the earlier tokens are the ones kept.
                kept_ties = torch.nonzero(sel & (s == tie)).flatten()
                dropped_ties = torch.nonzero(~sel & (s == tie)).flatten()
                if len(dropped_ties):
                    assert kept_ties.max() < dropped_ties.min()


# ---- eviction


def build_for_eviction(data, batch, heads, group, c, head_dim, seed):
    """A store with uneven heads, then a chunk of c new tokens appended; q is the chunk's queries."""
    builder = Builder(batch, heads, head_dim, torch.float32, seed)
    prompt = data.draw(st.integers(c, 40), label="prompt")
    builder.append(prompt, np.full(batch, prompt))
    builder.keep_random(data.draw(st.sampled_from([0.3, 0.7, 1.0]), label="share"))
    builder.append(c, np.full(batch, c))
    q = torch.randn(batch, heads * group, c, head_dim, generator=builder.gen)
    return builder, q


def kept_dense_mask(store: RaggedStore, cand: Candidates) -> torch.Tensor:
    """[B, H, T] bool: which of the candidates the store holds now (positions are unique within a head)."""
    b, h, _ = cand.valid.shape
    mask = torch.zeros_like(cand.valid)
    for row in range(b):
        for head in range(h):
            held = set(store.head_positions(row, head).tolist())
            mask[row, head] = cand.valid[row, head] & torch.tensor(
                [p in held for p in cand.positions[row, head].tolist()], dtype=torch.bool)
    return mask


def eviction_case(data, batch, heads, group, c, sink, window, seed):
    """A random store, its candidates, and per-head budgets between the protected count and a bit over the count."""
    builder, q = build_for_eviction(data, batch, heads, group, c, 8, seed)
    cand = Candidates.from_store(builder.store)
    count = cand.valid.sum(dim=-1)
    protected_count = torch.clamp(count, max=sink + window)
    budget = np.array([[data.draw(st.integers(int(protected_count[r, h_]), int(count[r, h_]) + 3), label="budget")
                        for h_ in range(heads)] for r in range(batch)], dtype=np.int64)
    return builder.store, builder.model, q, cand, count, protected_count, budget


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.sampled_from(SCORERS),
       st.integers(0, 2), st.integers(0, 3), st.integers(0, 2**16), st.data())
def test_evict_keeps_each_heads_top_budget_and_every_protected_token(batch, heads, group, c, scorer, sink, window,
                                                                      seed, data):
    store, model, q, cand, count, protected_count, budget = eviction_case(data, batch, heads, group, c, sink, window,
                                                                          seed)
    scores = protect_and_mask(scorers.score(scorer, q, cand.keys, cand.values, cand.valid, 0.3, rope=ROPE), cand.valid,
                              sink, window)
    evict(store, cand, q, budget, scorer=scorer, sink=sink, window=window, adaptive=False, scale=0.3, rope=ROPE)
    kept = kept_dense_mask(store, cand)
    assert torch.equal(kept.sum(dim=-1), torch.minimum(torch.as_tensor(budget), count))
    assert bool((kept | (scores != math.inf)).all()), "a protected (sink / window) token was evicted"
    for row in range(batch):
        for head in range(heads):
            s, sel, real = scores[row, head], kept[row, head], cand.valid[row, head]
            if sel.any() and (real & ~sel).any():
                assert s[sel].min() >= s[real & ~sel].max()
    model.keep(kept_sets(cand.positions, kept))
    check_store(store, model)  # the kept tokens themselves, in order, and a layout with room again


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.sampled_from(SCORERS), st.integers(0, 2),
       st.integers(0, 3), st.integers(0, 2**16), st.data())
def test_adaptive_evict_keeps_the_row_total(batch, heads, c, scorer, sink, window, seed, data):
    store, model, q, cand, count, protected_count, budget = eviction_case(data, batch, heads, 2, c, sink, window, seed)
    # AdaKV first gives every head a floor share of the row's total (at most what the head holds).
    floor = np.minimum(np.floor(0.2 * budget.sum(axis=1) / heads).astype(np.int64)[:, None], count.numpy())
    evict(store, cand, q, budget, scorer=scorer, sink=sink, window=window, adaptive=True, scale=0.3, rope=ROPE)
    kept = kept_dense_mask(store, cand)
    assert torch.equal(kept.sum(dim=(1, 2)), torch.minimum(torch.as_tensor(budget.sum(axis=1)), count.sum(dim=1)))
    assert bool((kept <= cand.valid).all())
    scores = protect_and_mask(scorers.score(scorer, q, cand.keys, cand.values, cand.valid, 0.3, rope=ROPE), cand.valid,
                              sink, window)
    for row in range(batch):
        # Room for every head's floor and protected tokens: then no protected token is evicted.
        if np.maximum(floor[row], protected_count[row].numpy()).sum() <= budget[row].sum():
            assert bool((kept[row] | (scores[row] != math.inf)).all()), "a protected token was evicted"
    model.keep(kept_sets(cand.positions, kept))
    check_store(store, model)


def test_adaptive_keep_spends_the_whole_total_when_a_head_is_short():
    t = 100
    valid = torch.zeros(1, 2, t, dtype=torch.bool)
    valid[0, 0, -1] = True  # head 0 holds one token, head 1 a hundred
    valid[0, 1] = True
    scores = protect_and_mask(torch.rand(1, 2, t, generator=torch.Generator().manual_seed(0)), valid, 2, 8)
    keep = torch.minimum(adaptive_keep(scores, torch.tensor([41])), valid.sum(dim=-1))
    assert int(keep.sum()) == 41


# ---- scorers with per-head valid


def per_head_keys(data, batch, heads, c, head_dim, gen):
    """Right-aligned keys/values with a different number of tokens per head (each >= the chunk's c)."""
    lengths = torch.tensor([[data.draw(st.integers(c, 24), label="length") for _ in range(heads)]
                            for _ in range(batch)])
    t = int(lengths.max())
    valid = torch.arange(t)[None, None, :] >= (t - lengths)[..., None]
    k, v = torch.randn(2, batch, heads, t, head_dim, generator=gen)
    return k * valid[..., None], v * valid[..., None], valid, lengths


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCORERS), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
       st.integers(0, 2**16), st.data())
def test_scores_of_held_tokens_ignore_empty_slots(scorer, batch, heads, group, c, seed, data):
    gen = torch.Generator().manual_seed(seed)
    k, v, valid, lengths = per_head_keys(data, batch, heads, c, 8, gen)
    q = torch.randn(batch, heads * group, c, 8, generator=gen)
    scores = scorers.score(scorer, q, k, v, valid, 0.35, rope=ROPE)
    assert scores.shape == valid.shape and scores.dtype == torch.float32
    assert bool(torch.isfinite(scores[valid]).all())
    # Whatever the empty slots hold, the held tokens' scores do not move.
    junk = GARBAGE * torch.randn(2, *k.shape, generator=gen)
    k2, v2 = torch.where(valid[..., None], k, junk[0]), torch.where(valid[..., None], v, junk[1])
    torch.testing.assert_close(scorers.score(scorer, q, k2, v2, valid, 0.35, rope=ROPE)[valid], scores[valid],
                               atol=1e-6, rtol=1e-6)
    # Each head scores as it would alone, with no empty slots at all (streaming: same order, shifted).
    t = valid.shape[-1]
    for row in range(batch):
        for head in range(heads):
            n = int(lengths[row, head])
            alone = scorers.score(scorer, q[row:row + 1, head * group:(head + 1) * group],
                                  k[row:row + 1, head:head + 1, t - n:], v[row:row + 1, head:head + 1, t - n:],
                                  torch.ones(1, 1, n, dtype=torch.bool), 0.35, rope=ROPE)[0, 0]
            mine = scores[row, head, t - n:]
            if scorer == "streaming":
                torch.testing.assert_close(mine - (t - n), alone)
            else:
                torch.testing.assert_close(mine, alone, atol=1e-5, rtol=1e-5)


def test_score_rejects_an_unknown_scorer():
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="unknown scorer"):
        scorers.score("h2o", q, k, k, torch.ones(1, 1, 2, dtype=torch.bool))
