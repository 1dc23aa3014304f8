"""Peak resident memory of prefilling SmolLM2 at 8k: LU-KV whole prompt vs chunked prefill vs plain transformers.

Each variant runs in its own process. After loading and a warm-up (which compiles), the process's peak
RSS is reset (/proc/self/clear_refs, Linux) and one prefill of the long prompt is measured: the peak
RSS during that prefill minus the RSS before it is the memory the prefill needed (activations, the
K/V it holds, and the final cache).

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill_memory.py --context 8192 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("plain", "lukv_whole", "lukv_chunked")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, context: int, chunk: int, compression: float) -> dict:
    import torch

    from lukv_compile import LUKVCache
    from lukv_compile.models import load_model
    from lukv_compile.runtime.chunked_prefill import chunked_prefill

    torch.set_num_threads(1)
    model, _ = load_model("smollm2")
    compiled = torch.compile(model, backend="lukv", options={"inner": "aot_eager"})
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def prefill(tokens):
        if variant == "plain":
            return model(input_ids=tokens, logits_to_keep=1)
        cache = LUKVCache(model.config, compression=compression)
        if variant == "lukv_chunked":
            return chunked_prefill(compiled, cache, tokens, chunk=chunk, logits_to_keep=1)
        return compiled(input_ids=tokens, cache=cache, logits_to_keep=1)

    for warm in (chunk // 2, chunk + 17, 2 * chunk + 5):  # compile every graph the measured run needs
        prefill(ids[:, :warm])
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    out = prefill(ids)
    peak = rss_kib("VmHWM")
    del out
    return {"variant": variant, "context": context, "chunk": chunk if variant == "lukv_chunked" else None,
            "rss_before_mib": before / 1024, "peak_mib": peak / 1024, "prefill_extra_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--compression", type=float, default=0.8)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.context, args.chunk, args.compression)), flush=True)
        return
    rows = []
    for variant in VARIANTS:
        print(f"measuring {variant} ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--context", str(args.context),
                                "--chunk", str(args.chunk), "--compression", str(args.compression)],
                               check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["variant"]: r for r in rows}
    extra = {variant: row["prefill_extra_mib"] for variant, row in by.items()}
    summary = {"chunked_vs_whole_extra": extra["lukv_chunked"] / extra["lukv_whole"],
               "chunked_vs_whole_peak": by["lukv_chunked"]["peak_mib"] / by["lukv_whole"]["peak_mib"],
               "whole_vs_plain_extra": extra["lukv_whole"] / extra["plain"]}
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
