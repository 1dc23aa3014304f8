"""The share of the full cache's score a method keeps, pooled over several `lukv eval --json` runs.

    python3 scripts/share_of_full.py global:kvzip docs/eval_runs/heldout{4,5,6}_multiturn_kvzip_1k.json
    python3 scripts/share_of_full.py global:kvzip docs/eval_runs/heldout6_single_kvzip_1k.json --compression 0.9

Each document is scored with the full cache and with the method, so the interval is a paired bootstrap: each
(run, task) stratum's documents are resampled with replacement (2000 times, seed 0) and the share is the ratio of
the method's mean to the full cache's; the 95% interval is the 2.5th and 97.5th percentiles. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random

ROUNDS = 2000


def paired_scores(paths: list[str], method: str,
                  compression: float | None) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(run, task) -> [(full score, method score)] per document, at `compression` (None: the method's only one)."""
    strata: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for path in paths:
        rows = json.load(open(path))["results"]
        ratios = {r["compression"] for r in rows if r["method"] == method}
        if compression is None and len(ratios) > 1:
            raise SystemExit(f"{path}: {method} ran at {sorted(ratios)}: choose one with --compression")
        by_doc: dict[tuple, dict[str, float]] = {}
        for row in rows:
            if row["method"] == "full" or compression is None or row["compression"] == compression:
                by_doc.setdefault((row["protocol"], row["task"], row["sample"]), {})[row["method"]] = row["score"]
        for (_, task, _), scores in sorted(by_doc.items()):
            if "full" not in scores or method not in scores:
                raise SystemExit(f"{path}: {task} lacks the full cache's or {method}'s row")
            strata.setdefault((path, task), []).append((scores["full"], scores[method]))
    return strata


def share(pairs: list[tuple[float, float]]) -> float:
    return sum(m for _, m in pairs) / sum(f for f, _ in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method")
    p.add_argument("runs", nargs="+", help="JSON files written by lukv eval --json, each with the full cache's rows")
    p.add_argument("--compression", type=float, default=None, help="the method's compression (if it ran at several)")
    args = p.parse_args()
    strata = paired_scores(args.runs, args.method, args.compression)
    pairs = [pair for docs in strata.values() for pair in docs]
    rng = random.Random(0)
    boots = sorted(share([rng.choice(docs) for docs in strata.values() for _ in docs]) for _ in range(ROUNDS))
    low, high = boots[int(0.025 * ROUNDS)], boots[int(0.975 * ROUNDS) - 1]
    print(f"{args.method}: {len(pairs)} documents, full {sum(f for f, _ in pairs) / len(pairs):.3f}, method "
          f"{sum(m for _, m in pairs) / len(pairs):.3f}: share {share(pairs):.1%} [{low:.1%}, {high:.1%}]")


if __name__ == "__main__":
    main()
