"""GPU microbenchmark: Triton decode attention over ragged per-head storage vs full-cache SDPA (flash).

Llama-8B-like layer: 32 query heads, 8 KV heads, head_dim 128, bf16, batch 8; contexts 8k/32k/128k at
compression 0.8 with non-uniform per-head budgets (Dirichlet shares, mean keep 0.2). The layer is a
`RaggedStore` on the GPU holding each head's kept tokens plus one appended decode token, exactly what
the cache hands `triton_decode_attention` (with `store.device_metadata()`). Checks the kernel against
`reference.segment_attention` in fp32 first (every num_splits tried), then times the kernel and
flash SDPA over the full cache with triton.testing.do_bench (L2 flushed, median) and reports the
achieved bandwidth (bytes of K/V read / time). Writes JSON to --out and prints it.

    python benchmarks/gpu_check.py --out gpu_check.json [--contexts 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np
import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
H200_HBM_GBPS = 4800.0
CHECK_SPLITS = (1, 2, 7)  # checked against the reference besides the default choice


def keep_counts(batch: int, context: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """[B, H] kept tokens: Dirichlet(2) shares of each row's total (mean keep `mean`), capped at the context."""
    shares = rng.gamma(2.0, size=(batch, KV_HEADS))
    fractions = np.clip(shares / shares.sum(axis=1, keepdims=True) * mean * KV_HEADS, 0.0, 1.0)
    return np.maximum(1, np.rint(fractions * context)).astype(np.int64)


def ragged_layer(batch: int, context: int, compression: float, rng: np.random.Generator,
                 gen: torch.Generator):
    """A store holding keep[b, h] tokens per head (an eviction's result), then one decode token appended."""
    from lukv_compile.runtime.storage import RaggedStore

    keep = keep_counts(batch, context, 1.0 - compression, rng)
    t = int(keep.max())
    store = RaggedStore(batch, KV_HEADS, HEAD_DIM, DTYPE, torch.device("cuda"))
    # Candidates right-aligned as RaggedStore.dense() gives them; each head keeps its newest keep[b, h].
    k = torch.randn(batch, KV_HEADS, t, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    v = torch.randn(batch, KV_HEADS, t, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    selected = torch.arange(t, device="cuda") >= (t - torch.as_tensor(keep, device="cuda"))[..., None]
    positions = torch.arange(context - t, context, device="cuda").expand(batch, KV_HEADS, t)
    store.replace(selected, k, v, positions)
    del k, v
    k_new = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    store.append(k_new, torch.randn_like(k_new), np.ones(batch, dtype=np.int64), context)
    return store


def flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple:
    """(callable, backend name): SDPA restricted to flash when it takes these inputs, else the default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    try:
        flash()
        return flash, "flash"
    except RuntimeError as err:
        print(f"flash SDPA refused these inputs ({err}); timing the default SDPA dispatch", file=sys.stderr)
        return (lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)), "default"


def check_against_reference(q: torch.Tensor, store, scale: float) -> dict:
    """Max abs error of the kernel (default and CHECK_SPLITS splits) vs fp32 segment attention."""
    from lukv_compile.kernels.reference import segment_attention
    from lukv_compile.kernels.triton_decode import triton_decode_attention

    expected = segment_attention(q.float(), store.keys.float(), store.values.float(), store.start, store.length,
                                 np.ones(q.shape[0], dtype=np.int64), scale)
    errors = {}
    for splits in (None, *CHECK_SPLITS):
        out = triton_decode_attention(q, store.keys, store.values, *store.device_metadata(), scale, num_splits=splits)
        errors["default" if splits is None else str(splits)] = float((out.float() - expected).abs().max())
    return {"max_abs_err_vs_reference": errors, "check_ok": max(errors.values()) <= 3e-2}


def bench_context(context: int, args, rng: np.random.Generator, gen: torch.Generator) -> dict:
    from triton.testing import do_bench

    from lukv_compile.kernels.triton_decode import default_num_splits, triton_decode_attention

    scale = HEAD_DIM**-0.5
    store = ragged_layer(args.batch, context, args.compression, rng, gen)
    q = torch.randn(args.batch, Q_HEADS, 1, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    seg_start, seg_len = store.device_metadata()
    result = {"context": context, "slots": store.keys.shape[0], "kept_tokens": store.num_tokens,
              "kept_share": store.num_tokens / (args.batch * KV_HEADS * (context + 1)),
              "num_splits": default_num_splits(q, store.keys, args.batch * KV_HEADS)}
    result.update(check_against_reference(q, store, scale))
    ours_ms = do_bench(lambda: triton_decode_attention(q, store.keys, store.values, seg_start, seg_len, scale),
                       warmup=25, rep=200, return_mode="median")
    result.update(ours_ms=ours_ms, ours_bytes=2 * store.num_tokens * HEAD_DIM * q.element_size())
    result["ours_gbps"] = result["ours_bytes"] / (ours_ms * 1e-3) / 1e9
    store = seg_start = seg_len = None  # free the ragged layer before allocating the full one
    k_full = torch.randn(args.batch, KV_HEADS, context + 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_full = torch.randn_like(k_full)
    sdpa, backend = flash_sdpa(q, k_full, v_full, scale)
    sdpa_ms = do_bench(sdpa, warmup=25, rep=200, return_mode="median")
    full_bytes = 2 * k_full.numel() * k_full.element_size()
    result.update(sdpa_backend=backend, sdpa_ms=sdpa_ms, sdpa_bytes=full_bytes,
                  sdpa_gbps=full_bytes / (sdpa_ms * 1e-3) / 1e9, ratio=sdpa_ms / ours_ms)
    result["ours_hbm_share"] = result["ours_gbps"] / H200_HBM_GBPS
    k_full = v_full = None
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compression", type=float, default=0.8)
    args = parser.parse_args()
    report = {"shape": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE),
                            batch=args.batch, compression=args.compression), "results": []}
    if not torch.cuda.is_available():
        report["error"] = "torch sees no CUDA device"
    else:
        import triton

        report.update(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__)
        rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
        for context in args.contexts:
            try:
                report["results"].append(bench_context(context, args, rng, gen))
            except Exception as err:  # noqa: BLE001  (report every context; one failure must not hide the rest)
                traceback.print_exc()
                report["results"].append({"context": context, "error": f"{type(err).__name__}: {err}"})
            print(json.dumps(report["results"][-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    failed = "error" in report or any("error" in r or r.get("check_ok") is False for r in report["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
