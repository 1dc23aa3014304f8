"""Results as Markdown tables with 95% bootstrap intervals, and a PNG plot.

A cell is (engine, protocol, context length, method, compression); its score is the mean over tasks of
each task's mean over samples, and its interval resamples the samples of every task (percentile
bootstrap). The oracle ceiling of a (protocol, context, compression) is the best `*:oracle` method there.
`write_results` replaces only the generated block between the BEGIN/END markers of an existing file,
so hand-written analysis around it survives a re-run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from lukv_compile.eval.harness import Result
from lukv_compile.eval.methods import ORACLE, split_name
from lukv_compile.profile import Profile

BEGIN = "<!-- lukv eval: generated results begin -->"
END = "<!-- lukv eval: generated results end -->"
RESAMPLES = 2000

Table = tuple[str, str, int]  # engine, protocol, context length
Cell = tuple[str, float]  # method, compression


def group(results: list[Result]) -> dict[Table, dict[Cell, dict[str, list[Result]]]]:
    """(engine, protocol, context) -> (method, compression) -> task -> results, in first-seen order."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        out[r.engine, r.protocol, r.context_tokens][r.method, r.compression][r.task].append(r)
    return out


def cell_mean(by_task: dict[str, list[Result]]) -> float:
    return statistics.fmean(statistics.fmean(r.score for r in rs) for rs in by_task.values())


def bootstrap_interval(by_task: dict[str, list[Result]], resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over tasks, resampling each task's samples with replacement."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for rs in by_task.values():
        scores = np.array([r.score for r in rs])
        picks = rng.integers(0, len(scores), size=(resamples, len(scores)))
        means += scores[picks].mean(axis=1)
    means /= len(by_task)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def is_oracle(method: str) -> bool:
    return method != "full" and split_name(method)[1] == ORACLE


def ceilings(runs: dict[Cell, dict[str, list[Result]]]) -> dict[float, float]:
    """compression -> best oracle mean."""
    best: dict[float, float] = {}
    for (method, compression), by_task in runs.items():
        if is_oracle(method):
            best[compression] = max(best.get(compression, 0.0), cell_mean(by_task))
    return best


def _optional_mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def markdown_table(results: list[Result]) -> str:
    """One table per (engine, protocol, context): per-task means, mean [95% CI], % of ceiling and of full."""
    if not results:
        raise ValueError("no results to report")
    parts = []
    for (engine, protocol, length), runs in group(results).items():
        tasks = list(dict.fromkeys(t for by_task in runs.values() for t in by_task))
        full = runs.get(("full", 0.0))
        full_mean = cell_mean(full) if full else None
        ceiling = ceilings(runs)
        n = sorted({len(rs) for by_task in runs.values() for rs in by_task.values()})
        parts.append(f"### {protocol}, context {length} tokens, {engine} engine (samples per task: "
                     f"{', '.join(map(str, n))})\n")
        parts.append("| method | compression | " + " | ".join(tasks) + " | mean [95% CI] | % of ceiling | % of full "
                     "| kept | KV bytes ratio | decode ms |")
        parts.append("|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|---:|")
        for (method, compression), by_task in sorted(runs.items(), key=lambda item: item[0][1]):
            per_task = " | ".join(f"{cell_mean({t: by_task[t]}):.2f}" if t in by_task else "-" for t in tasks)
            mean = cell_mean(by_task)
            low, high = bootstrap_interval(by_task)
            flat = [r for rs in by_task.values() for r in rs]
            of_ceiling, of_full = _share(mean, ceiling.get(compression)), _share(mean, full_mean)
            kept, ratio = _optional_mean([r.kept for r in flat]), _optional_mean([r.kv_ratio for r in flat])
            decode = [r.decode_ms for r in flat if r.decode_ms is not None]
            parts.append(f"| {method} | {compression:g} | {per_task} | {mean:.3f} [{low:.2f}, {high:.2f}] "
                         f"| {of_ceiling} | {of_full} | {_fmt(kept, '.3f')} | {_fmt(ratio, '.3f')} "
                         f"| {_fmt(statistics.median(decode) if decode else None, '.1f')} |")
        parts.append("")
    return "\n".join(parts)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def budget_table(results: list[Result]) -> str:
    """Per scorer: mean score of each budget allocation with that scorer, and LU-KV's share of the ceiling."""
    parts = []
    for (engine, protocol, length), runs in group(results).items():
        ceiling = ceilings(runs)
        by_scorer: dict[tuple[str, float], dict[str, float]] = defaultdict(dict)
        for (method, compression), by_task in runs.items():
            if method == "full":
                continue
            budget, scorer = split_name(method)
            by_scorer[scorer, compression][budget] = cell_mean(by_task)
        seen = {b for means in by_scorer.values() for b in means}
        budgets = ["uniform", "pyramid", "adakv", "lukv"] + (["floored"] if "floored" in seen else [])
        if not by_scorer:
            continue
        parts.append(f"#### Same-scorer baselines: {protocol}, context {length}, {engine} engine\n")
        parts.append("| scorer | compression | " + " | ".join(budgets) + " | LU-KV - best baseline | LU-KV / ceiling |")
        parts.append("|---|---:|" + "---:|" * (len(budgets) + 2))
        for (scorer, compression), means in sorted(by_scorer.items(), key=lambda item: (item[0][1], item[0][0])):
            cells = " | ".join(_fmt(means.get(b), ".3f") for b in budgets)
            baselines = [means[b] for b in budgets[:3] if b in means]
            gap = _fmt(means["lukv"] - max(baselines), "+.3f") if "lukv" in means and baselines else "-"
            share = _share(means["lukv"], ceiling.get(compression)) if "lukv" in means else "-"
            parts.append(f"| {scorer} | {compression:g} | {cells} | {gap} | {share} |")
        parts.append("")
    return "\n".join(parts)


def best(runs: dict[Cell, dict[str, list[Result]]], compression: float, budgets: tuple[str, ...]) -> tuple[str, float]:
    """(method, mean) of the best non-oracle method at `compression` whose budget is one of `budgets`
    (`lukv-*`: the budgets of any shipped LU-KV profile)."""
    def counted(budget: str) -> bool:
        return budget in budgets or ("lukv-*" in budgets and budget.startswith("lukv-"))

    scored = [(cell_mean(by_task), method) for (method, c), by_task in runs.items()
              if c == compression and method != "full" and not is_oracle(method)
              and counted(split_name(method)[0])]
    mean, method = max(scored, default=(float("nan"), "-"))
    return method, mean


def summary_table(results: list[Result], compressions: tuple[float, ...] = (0.8, 0.9)) -> str:
    """One line per (engine, protocol, context): full cache, oracle ceiling, best LU-KV, best other method.

    best LU-KV: a scorer on its own profile's budgets; "any LU-KV budgets" also counts a scorer (or
    reconstruction) on another shipped profile's budgets (`lukv-<s>:<scorer>`).
    """
    lines = ["| protocol | context | compression | full | oracle ceiling | best LU-KV | % of ceiling "
             "| best on any LU-KV budgets | % of ceiling | best other method | LU-KV - other |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|"]
    for (engine, protocol, length), runs in group(results).items():
        if engine != "simulated":
            continue
        full = runs.get(("full", 0.0))
        ceiling = ceilings(runs)
        for c in compressions:
            if c not in ceiling:
                continue
            lukv, lukv_mean = best(runs, c, ("lukv",))
            borrowed, borrowed_mean = best(runs, c, ("lukv", "lukv-*"))
            other, other_mean = best(runs, c, ("uniform", "pyramid", "adakv"))
            lines.append(f"| {protocol} | {length} | {c:g} | {_fmt(cell_mean(full) if full else None, '.3f')} "
                         f"| {ceiling[c]:.3f} | {lukv} {lukv_mean:.3f} | {_share(lukv_mean, ceiling[c])} "
                         f"| {borrowed} {borrowed_mean:.3f} | {_share(borrowed_mean, ceiling[c])} "
                         f"| {other} {other_mean:.3f} | {lukv_mean - other_mean:+.3f} |")
    return "\n".join(lines) + "\n"


def _share(mean: float, reference: float | None) -> str:
    """mean as a percentage of reference ('-' without one)."""
    return f"{100 * mean / reference:.0f}%" if reference else "-"


def cross_check(results: list[Result]) -> str:
    """Agreement of the two engines on the (protocol, context, task, sample, method, compression) both ran."""
    by_engine: dict[str, dict[tuple, Result]] = defaultdict(dict)
    for r in results:
        by_engine[r.engine][r.protocol, r.context_tokens, r.task, r.sample, r.method, r.compression] = r
    shared = sorted(set(by_engine["simulated"]) & set(by_engine["compiled"]))
    if not shared:
        return ""
    same_answer = sum(by_engine["simulated"][k].answer == by_engine["compiled"][k].answer for k in shared)
    same_score = sum(by_engine["simulated"][k].score == by_engine["compiled"][k].score for k in shared)
    return (f"**Cross-check, simulated vs compiled engine**: {len(shared)} (sample, method, compression) runs in "
            f"common; identical answers {same_answer}/{len(shared)}, identical scores {same_score}/{len(shared)}.\n")


def results_block(results: list[Result], meta: dict[str, str]) -> str:
    lines = [BEGIN, ""] + [f"- **{key}**: {value}" for key, value in meta.items()]
    lines += ["", "### Summary\n", summary_table(results), cross_check(results), markdown_table(results),
              budget_table(results), END]
    return "\n".join(lines)


def write_results(results: list[Result], path: str | Path, meta: dict[str, str],
                  title: str = "# Evaluation results") -> None:
    """Write (or update the generated block of) the Markdown results file."""
    path = Path(path)
    block = results_block(results, meta)
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"{title}\n\n{block}\n"
    path.write_text(text)


def plot_accuracy(results: list[Result], path: str | Path) -> None:
    """Mean score vs compression: LU-KV per scorer, the oracle ceiling, the full cache; one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = group(results)
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, ((engine, protocol, length), runs) in zip(axes[0], tables.items(), strict=True):
        curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (method, compression), by_task in runs.items():
            if method == "full":
                ax.axhline(cell_mean(by_task), color="black", linestyle="--", label="full")
            elif method.startswith("lukv:") or method == "uniform:snapkv":
                curves[method].append((compression, cell_mean(by_task)))
        curves["oracle ceiling"] = sorted(ceilings(runs).items())
        for method, points in curves.items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(f"{protocol}, {length} tokens ({engine})")
        ax.set_xlabel("compression (fraction of KV removed)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budgets(profile, path: str | Path, compression: float = 0.8) -> None:
    """Layers x KV heads keep-fraction heatmap of a profile (the `lukv inspect --png` picture)."""

    save_heatmap(profile, compression, Path(path))


def save_heatmap(profile: Profile, compression: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = 1.0 - profile.fractions(compression)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * profile.num_kv_heads + 2), max(3.0, 0.18 * profile.num_layers + 1)))
    image = ax.imshow(keep, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(0, profile.num_kv_heads, max(1, profile.num_kv_heads // 16)))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{profile.scorer} keep fraction\ncompression {compression:g}", fontsize=10)
    fig.colorbar(image, ax=ax, label="keep fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
