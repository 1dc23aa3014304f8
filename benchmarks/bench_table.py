"""Render a `lukv bench --json FILE` result as the Markdown tables of docs/benchmarks.md and the README.

    python benchmarks/bench_table.py docs/bench_smollm2_cpu.json
"""

from __future__ import annotations

import json
import sys


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def speed_table(rows: list[dict]) -> str:
    lines = ["| context | threads | KV MiB lukv / full | ratio | decode ms lukv / plain / static | decode vs plain "
             "| decode vs static | generate s (prefill + 64) lukv / plain / static | generate vs plain | vs static |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['threads']} ({r['num_threads']}) | {mib(r['kv_bytes_lukv'])} / "
            f"{mib(r['kv_bytes_full'])} | {r['kv_bytes_ratio']:.3f} | {r['decode_ms_lukv']:.1f} / "
            f"{r['decode_ms_plain']:.1f} / {r['decode_ms_static']:.1f} | {ratio(r['tokens_per_s_ratio_lukv_plain'])} | "
            f"{ratio(r['tokens_per_s_ratio_lukv_static'])} | {r['e2e_s_lukv']:.2f} / {r['e2e_s_plain']:.2f} / "
            f"{optional(r, 'e2e_s_static', '.2f')} | {ratio(r['e2e_speedup_lukv_plain'])} | "
            f"{optional(r, 'e2e_speedup_lukv_static', '.2f', 'x')} |")
    return "\n".join(lines)


def optional(row: dict, field: str, spec: str, suffix: str = "") -> str:
    """A field that rows written before it existed lack (static's generate: since issue 11's GPU check)."""
    return f"{row[field]:{spec}}{suffix}" if field in row else "-"


def prefill_table(rows: list[dict]) -> str:
    lines = ["| context | threads | prefill s lukv / plain / static | eviction inside the prefill (s) | "
             "share of plain prefill | attention op alone: lukv / SDPA ms (30 layers) | speed-up | "
             "first-call compile s lukv (prefill + decode) |",
             "|---|---|---|---|---|---|---|---|"]
    compiled = set()  # thread settings whose first row compiled: the later rows reuse those graphs
    for r in rows:
        compile_s = r["compile_s"]["lukv"]
        compile_cell = (f"{compile_s['prefill']:.0f} + {compile_s['decode']:.0f}" if r["threads"] not in compiled
                        else "(compiled above)")
        compiled.add(r["threads"])
        lines.append(
            f"| {r['context']} | {r['threads']} ({r['num_threads']}) | {r['prefill_s_lukv']:.2f} / "
            f"{r['prefill_s_plain']:.2f} / {r['prefill_s_static']:.2f} | {r['prefill_eviction_s']:.3f} | "
            f"{100 * r['prefill_eviction_share_of_plain']:.1f}% | {r['attention_ms_lukv']:.1f} / "
            f"{r['attention_ms_full_sdpa']:.1f} | {ratio(r['attention_speedup'])} | "
            f"{compile_cell} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench_table.py RESULT.json")
    with open(sys.argv[1]) as f:
        rows = json.load(f)["rows"]
    print(speed_table(rows))
    print()
    print(prefill_table(rows))


if __name__ == "__main__":
    main()
