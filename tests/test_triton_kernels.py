"""The Triton kernels against their torch references (reference.segment_attention, scorers.snapkv).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
defined); `LUKV_TEST_DEVICE=cuda` runs the same tests on a GPU (benchmarks/gpu_check.sh). The ragged
stores are built with `RaggedStore` itself, so the kernels see exactly the layout the cache hands them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("LUKV_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"LUKV_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, i.e. when the kernel modules import
elif not torch.cuda.is_available():
    pytest.skip("LUKV_TEST_DEVICE=cuda but torch sees no CUDA device", allow_module_level=True)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lukv_compile.kernels.reference import segment_attention  # noqa: E402
from lukv_compile.kernels.triton_decode import (  # noqa: E402
    _decode_kernel,
    default_num_splits,
    triton_decode_attention,
)
from lukv_compile.kernels.triton_snapkv import triton_window_attention_mean  # noqa: E402
from lukv_compile.policy import scorers  # noqa: E402
from lukv_compile.policy.eviction import Candidates, score_candidates  # noqa: E402
from lukv_compile.policy.scorers import ScoreInputs, snapkv  # noqa: E402
from lukv_compile.policy.selection import select_tokens  # noqa: E402
from lukv_compile.runtime.storage import RaggedStore, Segments  # noqa: E402


@triton.jit
def _add_one(x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def triton_runs_here() -> str | None:
    """None if a trivial kernel runs on DEVICE, else why not."""
    x = torch.zeros(16, device=DEVICE)
    try:
        _add_one[(1,)](x, N=16)
    except Exception as err:  # noqa: BLE001  (any failure means: this Triton cannot run here)
        return f"Triton cannot run a kernel on {DEVICE} here ({type(err).__name__}: {err})"
    return None if bool((x == 1).all()) else f"Triton's {DEVICE} run of a trivial kernel gave wrong values"


_WHY_NOT = triton_runs_here()
if DEVICE == "cpu" and _WHY_NOT is None and not isinstance(_decode_kernel, InterpretedFunction):
    _WHY_NOT = "the lukv Triton kernels were imported before TRITON_INTERPRET=1 was set (not interpretable)"
if _WHY_NOT is not None:
    pytest.skip(_WHY_NOT, allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Outputs are rounded to the input dtype; on GPU fp16/bf16 probabilities also go through the tensor cores.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=1e-2),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
EXAMPLES = settings(max_examples=40 if DEVICE == "cpu" else 100, deadline=None)
GARBAGE = 50.0  # free slots hold stale finite values; a kernel that reads one is off by about this much

# Segment lengths around the 64-slot tile: empty, single, one under/over a tile, several tiles.
segment_length = st.one_of(st.sampled_from([0, 1, 63, 64, 65, 130]), st.integers(0, 140))
gqa_group = st.sampled_from([1, 2, 3, 4, 8])


def ragged_store(lengths: np.ndarray, head_dim: int, dtype: torch.dtype, seed: int) -> RaggedStore:
    """A store on DEVICE whose head (b, h) holds lengths[b, h] tokens, built as the cache builds one.

    A prompt is appended, each head keeps a random subset of the requested size (eviction), and the free
    slots are then filled with GARBAGE.
    """
    gen = torch.Generator().manual_seed(seed)
    b, h = lengths.shape
    t = max(int(lengths.max()), 1)
    store = RaggedStore(b, h, head_dim, dtype, torch.device(DEVICE))
    k, v = torch.randn(2, b, h, t, head_dim, generator=gen).to(dtype).to(DEVICE)
    store.append(k, v, np.full(b, t, dtype=np.int64), 0)
    keys, values, positions, valid = store.dense()
    noise = torch.rand(b, h, t, generator=gen).to(DEVICE)
    store.replace(select_tokens(noise, torch.as_tensor(lengths, device=DEVICE)), keys, values, positions)
    assert np.array_equal(store.length, lengths)
    for row in range(b):
        for head in range(h):
            s, n, cap = int(store.start[row, head]), int(store.length[row, head]), int(store.cap[row, head])
            store.keys[s + n:s + cap], store.values[s + n:s + cap] = GARBAGE, -GARBAGE
    return store


def truth(q: torch.Tensor, store: RaggedStore | Segments, scale: float) -> torch.Tensor:
    """fp32 segment attention on CPU from the same (already rounded) inputs; only the kernel rounds its output."""
    ones = np.ones(q.shape[0], dtype=np.int64)
    return segment_attention(q.float().cpu(), store.keys.float().cpu(), store.values.float().cpu(), store.start,
                             store.length, ones, scale)


@EXAMPLES
@given(st.integers(1, 2), st.integers(1, 2), gqa_group, st.sampled_from([16, 64]), st.sampled_from(DTYPES),
       st.sampled_from([None, 1, 2, 3, 5]), st.data())
def test_decode_matches_segment_attention(b, h, group, head_dim, dtype, num_splits, data):
    lengths = np.array(data.draw(st.lists(segment_length, min_size=b * h, max_size=b * h)), dtype=np.int64)
    seed = data.draw(st.integers(0, 2**16))
    store = ragged_store(lengths.reshape(b, h), head_dim, dtype, seed)
    q = torch.randn(b, h * group, 1, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    q = q.to(DEVICE)
    out = triton_decode_attention(q, store.keys, store.values, *store.device_metadata(), head_dim**-0.5,
                                  num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous() and out.device == q.device
    torch.testing.assert_close(out.float().cpu(), truth(q, store, head_dim**-0.5), **TOLERANCE[dtype])
    empty = torch.as_tensor(store.length == 0).repeat_interleave(group, dim=1)
    assert bool((out.cpu()[empty] == 0).all())


@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_decode_after_decode_appends(num_splits):
    """The decode loop: append one token per step, attend with the store's device metadata each time."""
    gen = torch.Generator().manual_seed(7)
    b, h, group, d = 2, 2, 3, 32
    store = ragged_store(np.array([[5, 70], [0, 64]]), d, torch.float32, 1)
    for step in range(3):
        k, v = torch.randn(2, b, h, 1, d, generator=gen).to(DEVICE)
        store.append(k, v, np.ones(b, dtype=np.int64), 200 + step)
        q = torch.randn(b, h * group, 1, d, generator=gen).to(DEVICE)
        out = triton_decode_attention(q, store.keys, store.values, *store.device_metadata(), 0.2,
                                      num_splits=num_splits)
        torch.testing.assert_close(out.cpu(), truth(q, store, 0.2), **TOLERANCE[torch.float32])


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 2), gqa_group, st.sampled_from(DTYPES), st.sampled_from([None, 1, 3]),
       st.integers(1, 3), st.data())
def test_decode_over_a_shared_prefix_matches_the_unshared_store(rows, h, group, dtype, num_splits, steps, data):
    """A fork's heads read the shared prefix then their own tokens: the kernel merges both parts' partials."""
    lengths = np.array(data.draw(st.lists(segment_length, min_size=h, max_size=h)), dtype=np.int64)
    lengths[-1] = max(lengths[-1], 1)  # some head holds a token, so there is a prefix (others may hold none)
    seed = data.draw(st.integers(0, 2**16))
    fork = ragged_store(lengths.reshape(1, h), 32, dtype, seed).fork_rows(np.zeros(rows, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        k, v = torch.randn(2, rows, h, 1, 32, generator=gen).to(dtype).to(DEVICE)
        fork.append(k, v, np.ones(rows, dtype=np.int64), 500 + step)
    q = torch.randn(rows, h * group, 1, 32, generator=gen).to(dtype).to(DEVICE)
    prefix = (fork.prefix.keys, fork.prefix.values, *fork.prefix_device_metadata())
    out = triton_decode_attention(q, fork.keys, fork.values, *fork.device_metadata(), 0.2, num_splits=num_splits,
                                  prefix=prefix)
    # against the same tokens packed in one segment per head, no prefix
    torch.testing.assert_close(out.float().cpu(), truth(q, fork.packed(), 0.2), **TOLERANCE[dtype])


def test_decode_rejects_bad_inputs():
    store = ragged_store(np.array([[2, 3]]), 16, torch.float32, 0)
    start, length = store.device_metadata()
    args = (store.keys, store.values, start, length, 0.25)
    q = torch.randn(1, 2, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one decode token"):
        triton_decode_attention(torch.randn(1, 2, 2, 16, device=DEVICE), *args)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_decode_attention(torch.randn(1, 3, 1, 16, device=DEVICE), *args)
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode_attention(q, *args, num_splits=0)
    with pytest.raises(ValueError, match="must both be"):
        triton_decode_attention(q, store.keys, store.values, start, length[:, :1], 0.25)
    with pytest.raises(ValueError, match="must both be"):
        triton_decode_attention(torch.randn(2, 2, 1, 16, device=DEVICE), *args)
    with pytest.raises(ValueError, match="must both be"):
        triton_decode_attention(q, store.keys, store.values[:-1], start, length, 0.25)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_decode_attention(q, store.keys, store.values.half(), start, length, 0.25)
    strided = torch.randn(store.keys.shape[0], 32, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="unit stride"):
        triton_decode_attention(q, strided, strided, start, length, 0.25)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU fallback of the split heuristic")
def test_default_num_splits_is_one_off_gpu():
    assert default_num_splits(torch.zeros(1, 2, 1, 16), torch.zeros(4096, 16), 2) == 1


@EXAMPLES
@given(st.integers(1, 2), st.integers(1, 2), gqa_group, st.integers(1, 100), st.sampled_from([16, 64]),
       st.sampled_from(DTYPES), st.sampled_from([1, 7, 32]), st.data())
def test_snapkv_matches_reference(b, h, group, t, head_dim, dtype, window, data):
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h * group, t, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(b, t, h, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)  # model layout view
    padding = torch.tensor(data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    valid = (torch.arange(t)[None, :] >= padding[:, None]).to(DEVICE)  # left padding, all-padding rows too
    w = min(window, t)
    out = snapkv.from_window_mean(triton_window_attention_mean(q, k, valid, head_dim**-0.5, w), w, h)
    inputs = ScoreInputs(q, k, k, valid[:, None, :].expand(b, h, t), head_dim**-0.5)
    expected = snapkv.snapkv_scores(inputs, obs_window=window)
    assert out.shape == (b, h, t) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-4)


def test_snapkv_rejects_bad_inputs():
    q, k = torch.randn(1, 2, 40, 16, device=DEVICE), torch.randn(1, 1, 40, 16, device=DEVICE)
    valid = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="obs_window"):
        triton_window_attention_mean(q, k, valid, 0.25, 33)
    with pytest.raises(ValueError, match="obs_window"):
        triton_window_attention_mean(q, k, valid, 0.25, 0)
    with pytest.raises(ValueError, match="valid must be bool"):
        triton_window_attention_mean(q, k, valid.int(), 0.25, 32)
    with pytest.raises(ValueError, match="valid must be bool"):
        triton_window_attention_mean(q, k, valid[:, None, :].expand(1, 1, 40), 0.25, 32)  # per-head: the torch path's
    with pytest.raises(ValueError, match="q must be"):
        triton_window_attention_mean(q, k[:, :, :30], valid, 0.25, 32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_window_attention_mean(torch.randn(1, 3, 40, 16, device=DEVICE),
                                     torch.randn(1, 2, 40, 16, device=DEVICE), valid, 0.25, 32)


@pytest.mark.skipif(DEVICE != "cuda", reason="eviction only swaps in the Triton scorer for CUDA tensors")
def test_eviction_scores_a_chunk_with_triton_snapkv_on_gpu():
    gen = torch.Generator().manual_seed(3)
    b, h, group, c, d = 2, 2, 2, 40, 16
    q = torch.randn(b, h * group, c, d, generator=gen)
    k, v = torch.randn(2, b, h, c, d, generator=gen)
    counts = np.array([40, 35])
    on_gpu = score_candidates("snapkv", q.cuda(), Candidates.from_chunk(k.cuda(), v.cuda(), counts, 0), 0.25)
    on_cpu = score_candidates("snapkv", q, Candidates.from_chunk(k, v, counts, 0), 0.25)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-6, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="eviction only swaps in the Triton scorer for CUDA tensors")
def test_eviction_scores_a_store_with_equal_heads_on_gpu():
    gen = torch.Generator().manual_seed(4)
    store = RaggedStore(1, 2, 16, torch.float32, torch.device(DEVICE))
    k = torch.randn(1, 2, 40, 16, generator=gen).to(DEVICE)
    store.append(k, k, np.array([40]), 0)  # both heads hold 40 tokens: row-uniform valid
    q = torch.randn(1, 4, 1, 16, generator=gen)  # a decode step's queries
    on_gpu = score_candidates("snapkv", q.to(DEVICE), Candidates.from_store(store), 0.25)
    cand = Candidates.from_store(store)
    on_cpu = scorers.score("snapkv", q, cand.keys.cpu(), cand.values.cpu(), cand.valid.cpu(), 0.25)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-6, rtol=1e-4)
