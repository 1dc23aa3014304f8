"""Every Triton kernel against its torch reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
defined); `LUKV_TEST_DEVICE=cuda` runs the same tests on a GPU (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os

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
from test_reference_kernels import ragged_cache  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from lukv_compile import scorers  # noqa: E402
from lukv_compile.kernels import reference  # noqa: E402
from lukv_compile.kernels.triton_compact import triton_compact_into_segments  # noqa: E402
from lukv_compile.kernels.triton_decode import (  # noqa: E402
    _decode_kernel,
    default_num_splits,
    triton_decode_attention,
)
from lukv_compile.kernels.triton_snapkv import triton_snapkv_scores  # noqa: E402


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
EXAMPLES = settings(max_examples=25, deadline=None)

# Segment lengths around the 64-slot tile: empty, single, one under/over a tile, several tiles.
segment_length = st.one_of(st.sampled_from([0, 1, 63, 64, 65, 130]), st.integers(0, 140))
gqa_group = st.sampled_from([1, 2, 3, 4, 8])


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 2), gqa_group, st.sampled_from([16, 64, 128]), st.sampled_from(DTYPES),
       st.sampled_from([None, 1, 2, 3, 5]), st.data())
def test_decode_matches_reference(b, h, group, head_dim, dtype, num_splits, data):
    lengths = torch.tensor(data.draw(st.lists(segment_length, min_size=b * h, max_size=b * h))).view(b, h)
    seed = data.draw(st.integers(0, 2**16))
    cache = {name: t.to(DEVICE) for name, t in ragged_cache(lengths, 3, head_dim, dtype, seed).items()}
    q = torch.randn(b, h * group, 1, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    args = (q, cache["keys"], cache["values"], cache["seg_start"], cache["seg_len"])
    out = triton_decode_attention(*args, head_dim**-0.5, num_splits=num_splits)
    # The truth in fp32 from the same (already rounded) inputs; only the kernel rounds its output.
    expected = reference.decode_attention(*(a.float() if a.is_floating_point() else a for a in args),
                                          head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    empty = (lengths == 0).repeat_interleave(group, dim=1).to(DEVICE)
    assert bool((out[empty] == 0).all())


def test_decode_rejects_bad_inputs():
    cache = ragged_cache(torch.tensor([[2, 3]]), 1, 16, torch.float32, 0)
    args = (cache["keys"], cache["values"], cache["seg_start"], cache["seg_len"], 0.25)
    with pytest.raises(ValueError, match="one decode token"):
        triton_decode_attention(torch.randn(1, 2, 2, 16), *args)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_decode_attention(torch.randn(1, 3, 1, 16), *args)
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode_attention(torch.randn(1, 2, 1, 16), *args, num_splits=0)


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
    out = triton_snapkv_scores(q, k, valid, head_dim**-0.5, obs_window=window)
    expected = scorers.snapkv_scores(q, k, valid, head_dim**-0.5, obs_window=window)
    assert out.shape == (b, h, t) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-4)


def test_snapkv_rejects_a_window_longer_than_one_tile():
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16)
    with pytest.raises(ValueError, match="obs_window"):
        triton_snapkv_scores(q, k, torch.ones(1, 40, dtype=torch.bool), 0.25, obs_window=33)


def empty_layer(slots: int, b: int, h: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """keys, values, positions, seg_start, seg_len, seg_cap, with stale contents."""
    return [torch.full((slots, d), 7.0, dtype=dtype, device=DEVICE),
            torch.full((slots, d), -7.0, dtype=dtype, device=DEVICE),
            torch.full((slots,), 99, dtype=torch.int32, device=DEVICE),
            torch.zeros(b, h, dtype=torch.int64, device=DEVICE),
            torch.zeros(b, h, dtype=torch.int32, device=DEVICE),
            torch.zeros(b, h, dtype=torch.int32, device=DEVICE)]


@EXAMPLES
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 150), st.sampled_from([16, 64]),
       st.sampled_from(DTYPES), st.integers(0, 3), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.integers(0, 2**16))
def test_compaction_matches_reference_exactly(b, h, t, head_dim, dtype, room, keep_share, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, t, h, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, h, t, head_dim, generator=gen).to(dtype).to(DEVICE)
    selected = (torch.rand(b, h, t, generator=gen) < keep_share).to(DEVICE)
    slots = int(selected.sum()) + room * b * h + 2
    ours, theirs = empty_layer(slots, b, h, head_dim, dtype), empty_layer(slots, b, h, head_dim, dtype)
    triton_compact_into_segments(selected, k, v, *ours, room)
    reference.compact_into_segments(selected, k, v, *theirs, room)
    for name, mine, truth in zip(("keys", "values", "positions", "seg_start", "seg_len", "seg_cap"),
                                 ours, theirs, strict=True):
        assert torch.equal(mine, truth), name


def test_compaction_refuses_a_layer_too_small():
    k = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="eviction keeps 5 slots"):
        triton_compact_into_segments(torch.ones(1, 1, 4, dtype=torch.bool), k, k, *empty_layer(4, 1, 1, 16,
                                     torch.float32), room=1)


@pytest.mark.parametrize("scorer", ["snapkv", "keydiff", "streaming"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_cuda_evict_prefill_matches_reference(scorer, adaptive):
    from lukv_compile.kernels.cuda import evict_prefill_cuda

    gen = torch.Generator().manual_seed(3)
    b, h, group, t, d, room = 2, 2, 2, 40, 16, 3
    q = torch.randn(b, h * group, t, d, generator=gen).to(DEVICE)
    k, v = torch.randn(2, b, h, t, d, generator=gen).to(DEVICE)
    mask = torch.zeros(b, 1, t, t, device=DEVICE)
    mask[1, :, :, :5] = float("-inf")  # row 1 is left-padded by 5
    budget = torch.tensor([[6, 11], [9, 2]], dtype=torch.int32, device=DEVICE)
    layers = []
    for kernel in (evict_prefill_cuda, reference.evict_prefill):
        layer = empty_layer(b * h * (t + room), b, h, d, torch.float32)
        seen = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        kernel(q, k, v, mask, *layer, budget, seen, scorer, 2, 4, adaptive, room, d**-0.5)
        layers.append((*layer, seen))
    for mine, truth in zip(*layers, strict=True):
        assert torch.equal(mine, truth)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA registration is only reachable with CUDA tensors")
def test_registered_cuda_decode_op_runs_triton():
    import lukv_compile.kernels.cuda  # noqa: F401

    cache = {n: t.cuda() for n, t in ragged_cache(torch.tensor([[5, 70]]), 2, 64, torch.float16, 0).items()}
    q = torch.randn(1, 4, 1, 64, dtype=torch.float16, device="cuda")
    args = (q, cache["keys"], cache["values"], cache["seg_start"], cache["seg_len"], 0.125)
    torch.testing.assert_close(torch.ops.lukv.decode_attention(*args), triton_decode_attention(*args))
