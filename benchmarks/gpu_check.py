"""GPU microbenchmark: Triton decode attention over the ragged cache vs full-cache SDPA (flash).

Llama-8B-like layer: 32 query heads, 8 KV heads, head_dim 128, bf16, batch 8; contexts 8k/32k/128k at
compression 0.8 with non-uniform per-head budgets (mean keep 0.2). Checks the kernel against the torch
reference first, then times both with triton.testing.do_bench (L2 flushed, median) and reports the
achieved bandwidth (bytes of K/V read / time). Writes JSON to --out and prints it.

    python benchmarks/gpu_check.py --out gpu_check.json [--contexts 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
H200_HBM_GBPS = 4800.0
CHECK_MAX_CONTEXT = 32768  # the torch reference's [slots, group, D] temporaries grow with the context


def keep_fractions(batch: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """[B, H] keep fractions, Dirichlet-shaped per row with the given mean, capped at 1."""
    shares = torch._standard_gamma(torch.full((batch, KV_HEADS), 2.0), generator=gen)
    return (shares / shares.sum(dim=1, keepdim=True) * mean * KV_HEADS).clamp(max=1.0)


def ragged_layer(batch: int, context: int, compression: float, room: int, gen: torch.Generator) -> dict:
    lengths = (keep_fractions(batch, 1.0 - compression, gen) * context).round().long()
    cap = (lengths + room).flatten()
    slots = int(cap.sum())
    return dict(keys=torch.randn(slots, HEAD_DIM, generator=gen).to(DTYPE).cuda(),
                values=torch.randn(slots, HEAD_DIM, generator=gen).to(DTYPE).cuda(),
                seg_start=(cap.cumsum(0) - cap).view(batch, KV_HEADS).cuda(),
                seg_len=lengths.int().cuda())


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


def bench_context(context: int, args, gen: torch.Generator) -> dict:
    from triton.testing import do_bench

    from lukv_compile.kernels import reference
    from lukv_compile.kernels.triton_decode import default_num_splits, triton_decode_attention

    scale = HEAD_DIM**-0.5
    layer = ragged_layer(args.batch, context, args.compression, args.room, gen)
    q = torch.randn(args.batch, Q_HEADS, 1, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    ragged = (q, layer["keys"], layer["values"], layer["seg_start"], layer["seg_len"])
    result = {"context": context, "slots": layer["keys"].shape[0],
              "num_splits": default_num_splits(q, layer["keys"], args.batch * KV_HEADS)}
    ours = triton_decode_attention(*ragged, scale)
    if context <= CHECK_MAX_CONTEXT:
        expected = reference.decode_attention(*(t.float() if t.is_floating_point() else t for t in ragged), scale)
        result["max_abs_err_vs_reference"] = float((ours.float() - expected).abs().max())
        result["check_ok"] = bool(torch.allclose(ours.float(), expected, atol=3e-2, rtol=3e-2))
    live = int(layer["seg_len"].sum())
    ours_ms = do_bench(lambda: triton_decode_attention(*ragged, scale), warmup=25, rep=200, return_mode="median")
    result.update(ours_ms=ours_ms, ours_bytes=2 * live * HEAD_DIM * q.element_size())
    result["ours_gbps"] = result["ours_bytes"] / (ours_ms * 1e-3) / 1e9
    op_ms = do_bench(lambda: torch.ops.lukv.decode_attention(*ragged, scale), warmup=25, rep=200,
                     return_mode="median")
    result["registered_op_ms"] = op_ms
    layer = ragged = None  # free the ragged cache before allocating the full one
    k_full = torch.randn(args.batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=DTYPE)
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
    parser.add_argument("--room", type=int, default=64)
    args = parser.parse_args()
    report = {"shape": dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE),
                            batch=args.batch, compression=args.compression, room=args.room), "results": []}
    if not torch.cuda.is_available():
        report["error"] = "torch sees no CUDA device"
    else:
        report["device"] = torch.cuda.get_device_name(0)
        report["torch"] = torch.__version__
        import triton

        import lukv_compile.kernels.cuda  # noqa: F401  (registers the Triton kernels on the lukv:: ops)

        report["triton"] = triton.__version__
        gen = torch.Generator().manual_seed(0)
        for context in args.contexts:
            try:
                report["results"].append(bench_context(context, args, gen))
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
