"""Results as Markdown (one table per context length) and PNG plots.

`write_results` replaces only the generated block between the BEGIN/END markers of an existing file,
so hand-written analysis around it survives a re-run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from lukv_compile.eval.harness import Row

BEGIN = "<!-- lukv eval: generated results begin -->"
END = "<!-- lukv eval: generated results end -->"


def _groups(rows: list[Row]) -> dict[int, dict[tuple[str, float], dict[str, Row]]]:
    """context length -> (method, compression) -> task -> Row, in first-seen order."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        out[row.context_tokens][(row.method, row.compression)][row.task] = row
    return out


def mean_score(by_task: dict[str, Row]) -> float:
    return statistics.fmean(r.score for r in by_task.values())


def markdown_table(rows: list[Row]) -> str:
    """Rows method x compression; columns per-task score, mean, % of full, KV bytes ratio, decode ms."""
    if not rows:
        raise ValueError("no result rows to report")
    parts = []
    for length, runs in _groups(rows).items():
        tasks = list(dict.fromkeys(t for by_task in runs.values() for t in by_task))
        full = runs.get(("full", 0.0))
        full_mean = mean_score(full) if full else None
        n = sorted({r.n for by_task in runs.values() for r in by_task.values()})
        parts.append(f"### Context {length} tokens (samples per task: {', '.join(map(str, n))})\n")
        parts.append("| method | compression | " + " | ".join(tasks) + " | mean | % of full | KV bytes ratio "
                     "| decode ms |")
        parts.append("|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|")
        for (method, compression), by_task in runs.items():
            scores = " | ".join(f"{by_task[t].score:.2f}" if t in by_task else "-" for t in tasks)
            mean = mean_score(by_task)
            of_full = f"{100 * mean / full_mean:.0f}%" if full_mean else "-"
            ratio = statistics.fmean(r.kv_ratio for r in by_task.values())
            decode = statistics.median(r.decode_ms for r in by_task.values())
            parts.append(f"| {method} | {compression:g} | {scores} | {mean:.3f} | {of_full} | {ratio:.3f} "
                         f"| {decode:.1f} |")
        parts.append("")
    return "\n".join(parts)


def results_block(rows: list[Row], meta: dict[str, str]) -> str:
    lines = [BEGIN, ""] + [f"- **{key}**: {value}" for key, value in meta.items()] + ["", markdown_table(rows), END]
    return "\n".join(lines)


def write_results(rows: list[Row], path: str | Path, meta: dict[str, str], title: str = "# Evaluation results") -> None:
    """Write (or update the generated block of) the Markdown results file."""
    path = Path(path)
    block = results_block(rows, meta)
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"{title}\n\n{block}\n"
    path.write_text(text)


def plot_accuracy(rows: list[Row], path: str | Path) -> None:
    """Mean score vs compression, one line per method (full cache as a dashed line), one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (length, runs) in zip(axes[0], groups.items(), strict=True):
        if len({c for m, c in runs if m != "full"}) <= 1:  # one ratio: lines would be dots on top of each other
            names = [m for m, _ in runs]
            ax.bar(names, [mean_score(by_task) for by_task in runs.values()], color="tab:blue")
            ax.set_title(f"context {length} tokens, compression {max(c for _, c in runs):g}")
            ax.set_ylabel("mean score")
            ax.set_ylim(0, 1.02)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            continue
        curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (method, compression), by_task in runs.items():
            curves[method].append((compression, mean_score(by_task)))
        for method, points in curves.items():
            if method == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", label="full")
                continue
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(f"context {length} tokens")
        ax.set_xlabel("compression (fraction of KV removed)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budgets(profile, path: str | Path, compression: float = 0.8) -> None:
    """Layers x KV heads keep-fraction heatmap of a profile (the `lukv inspect --png` picture)."""
    from lukv_compile.cli import save_heatmap

    save_heatmap(profile, compression, Path(path))
