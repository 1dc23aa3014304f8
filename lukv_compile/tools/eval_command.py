"""`lukv eval`: run the methods on the RULER-style tasks and write the results table and plot.

    lukv eval --model smollm2 --tasks passkey,niah_single --context 1024,4096 --samples 20 \
        --compression 0.5,0.8,0.9 --methods all --protocol agnostic,aware --out docs/results.md --json r.json
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m lukv_compile.tools.cli eval ...   # samples sharded
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from lukv_compile.data import HAYSTACKS
from lukv_compile.eval import report
from lukv_compile.eval.harness import ENGINES, Result, check_evaluation, check_tasks, evaluate
from lukv_compile.eval.methods import BUDGETS, parse_methods
from lukv_compile.eval.outside import load_ruler_docs
from lukv_compile.eval.simulate import PROTOCOLS
from lukv_compile.eval.tasks import TASKS, SampleSet
from lukv_compile.profiling.reconstruction import PROMPT_FORMATS
from lukv_compile.settings import INNER_COMPILERS
from lukv_compile.tools.cli_args import load_model_arg

DEFAULT_TASKS = "passkey,niah_single,niah_multikey"
DEFAULT_CONTEXT = "2048"
GENERATED_ONLY = ("tasks", "context", "seed", "haystacks")  # what --tasks-file replaces


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, KV memory and decode latency of the eviction methods",
                       description="Prefill each task's context, compress it, then feed the question in one "
                                   "forward and decode greedily (agnostic protocol), or compress the context with "
                                   "the question (aware); every method is a budget allocation x a scorer.")
    p.add_argument("--model", default="smollm2", help="model name (smollm2, gemma3) or a saved transformers folder")
    p.add_argument("--tasks", default=None, help=f"comma-separated tasks or all; from: {', '.join(TASKS)} "
                   f"(default {DEFAULT_TASKS}); with --from-json, the tasks whose rows the report keeps (default: all)")
    p.add_argument("--tasks-file", default=None,
                   help="lm-evaluation-harness RULER documents, one JSON object per line "
                        "(scripts/lmeval_ruler_samples.py writes them; lukv_compile/eval/outside.py): run the first "
                        "--samples of each task instead of --tasks, --context, --seed and --haystacks")
    p.add_argument("--context", default=None,
                   help=f"comma-separated context lengths in tokens (default {DEFAULT_CONTEXT})")
    p.add_argument("--samples", type=int, default=20, help="samples per task and context length (default 20)")
    p.add_argument("--compression", default="0.8", help="comma-separated compression ratios in [0, 1) "
                   "(default 0.8; the full cache always runs at 0)")
    p.add_argument("--methods", default="all", help=f"comma-separated methods or all: full, streaming, budget:scorer "
                   f"with budget in {', '.join(BUDGETS)}, lukv-<scorer>; scorer a runtime scorer or oracle")
    p.add_argument("--profile-dir", default=None, help="read the LU-KV profiles of lukv budgets from this folder "
                   "(<model>-<scorer>.safetensors) instead of the shipped ones")
    p.add_argument("--engine", choices=ENGINES, default="simulated",
                   help="simulated: one prefill per sample, every method decoded as one batch (default); "
                   "compiled: the product path, one LUKVCache per run, measures memory and decode time")
    p.add_argument("--protocol", default="agnostic", help=f"comma-separated protocols from {', '.join(PROTOCOLS)} "
                   "(default agnostic: the question is read after compression)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="chat",
                   help="chat template or plain text (default chat: the better one on the full cache)")
    p.add_argument("--inner", choices=INNER_COMPILERS, default="inductor",
                   help="compiled engine: compiler behind the lukv backend (default inductor)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill each context in chunks of this many tokens, evicting after each (default: whole)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=None, help="task sampling seed (default 0)")
    p.add_argument("--haystacks", default=None,
                   help=f"comma-separated haystacks the niah_* tasks hide their needles in, from "
                        f"{', '.join(HAYSTACKS)} (default persuasion); one run on another is reported as task@haystack")
    p.add_argument("--json", default=None, help="also write the result rows and run metadata to this JSON file")
    p.add_argument("--out", default=None, help="write the Markdown tables here (and <name>_accuracy.png, "
                   "<name>_budgets.png next to it)")
    p.add_argument("--from-json", default=None, help="comma-separated JSON files from earlier --json runs: "
                   "skip the evaluation and write the report (--out) from their rows (a row in several files "
                   "counts once)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def split_list(text: str, convert, name: str) -> list:
    try:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def check_output(path: str | None, name: str) -> None:
    if path is not None and not Path(path).parent.is_dir():
        raise ValueError(f"--{name}: folder {Path(path).parent} does not exist")


def canonical_command(args, tasks, contexts, compressions) -> str:
    samples = (f"--tasks-file {args.tasks_file}" if args.tasks_file else
               f"--tasks {','.join(tasks)} --context {','.join(map(str, contexts))} --seed {args.seed or 0}")
    parts = [f"lukv eval --model {args.model} {samples}",
             f"--samples {args.samples} --compression {','.join(f'{c:g}' for c in compressions)}",
             f"--methods {args.methods} --engine {args.engine} --protocol {args.protocol}",
             f"--prompt-format {args.prompt_format}"]
    parts += [f"--inner {args.inner}"] if args.engine == "compiled" else []
    parts += [f"--prefill-chunk {args.prefill_chunk}"] if args.prefill_chunk else []
    parts += [f"--haystacks {args.haystacks}"] if args.haystacks not in (None, "persuasion") else []
    parts += [f"--profile-dir {args.profile_dir}"] if args.profile_dir else []
    parts += [f"--threads {args.threads}"] if args.threads else []
    parts += [f"--json {args.json}"] if args.json else []
    parts += [f"--out {args.out}"] if args.out else []
    return " ".join(parts)


def run(args) -> int:
    if args.from_json:
        return report_from_json(args)
    import torch


    compressions = split_list(args.compression, float, "compression")
    parse_methods(args.methods)
    protocols = tuple(split_list(args.protocol, str, "protocol"))
    check_evaluation(args.samples, compressions, args.engine, protocols)
    tasks, contexts, haystacks, sample_sets = chosen_samples(args)
    check_output(args.json, "json")
    check_output(args.out, "out")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from lukv_compile.eval import methods
    from lukv_compile.profiling.run import init_distributed

    if args.profile_dir is not None:
        if not Path(args.profile_dir).is_dir():
            raise ValueError(f"--profile-dir: {args.profile_dir} is not a folder")
        methods.PROFILE_DIR = Path(args.profile_dir)

    rank, world = init_distributed()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))  # cores shared by the ranks
    model, tokenizer = load_model_arg(args.model, "float32")
    start = time.perf_counter()
    results = evaluate(model, tokenizer, args.methods, tasks, contexts, args.samples, compressions,
                       seed=args.seed or 0, progress=not args.no_progress, prompt_format=args.prompt_format,
                       engine=args.engine, protocols=protocols, inner=args.inner, prefill_chunk=args.prefill_chunk,
                       rank=rank, world=world, haystacks=haystacks, sample_sets=sample_sets)
    results = gather(results, world)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    meta = {
        "command": f"`{canonical_command(args, tasks, contexts, compressions)}`",
        "model": getattr(model.config, "name_or_path", args.model),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__}, {world} process(es) x {torch.get_num_threads()} thread(s)",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "samples": f"{args.samples} per task and context length, "
                   f"{f'from {args.tasks_file}' if args.tasks_file else f'seed {args.seed or 0}'}, "
                   f"prompt format {args.prompt_format}",
        "wall time": f"{elapsed / 60:.1f} min",
    }
    print(report.markdown_table(results))
    print(report.budget_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": [r.as_dict() for r in results]}, indent=1))
    if args.out:
        write_outputs(results, meta, model, Path(args.out))
    return 0


def chosen_samples(args) -> tuple[list[str], list[int], tuple[str, ...], list[SampleSet] | None]:
    """(tasks, context lengths, haystacks, sample sets): our generated tasks, or the documents of --tasks-file
    (then no tasks), checked before the model loads."""
    if args.tasks_file:
        given = [f"--{name}" for name in GENERATED_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--tasks-file gives the samples and their lengths: drop {', '.join(given)}")
        sample_sets = load_ruler_docs(args.tasks_file, args.samples)
        return [], sorted({s.context_tokens for s in sample_sets}), (), sample_sets
    tasks_text = args.tasks or DEFAULT_TASKS
    tasks = list(TASKS) if tasks_text == "all" else split_list(tasks_text, str, "tasks")
    contexts = split_list(args.context or DEFAULT_CONTEXT, int, "context")
    haystacks = tuple(split_list(args.haystacks or HAYSTACKS[0], str, "haystacks"))
    check_tasks(tasks, contexts, args.engine, haystacks)
    return tasks, contexts, haystacks, None


def gather(results: list[Result], world: int) -> list[Result]:
    """Every rank's results on every rank (torchrun), in sample order."""
    if world == 1:
        return results
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, results)
    merged = [r for part in parts for r in part]
    return sorted(merged, key=lambda r: (r.context_tokens, r.task, r.sample))


def report_from_json(args) -> int:
    """Merge the rows of earlier runs (e.g. methods split over processes) into one report."""

    if not args.out:
        raise ValueError("--from-json needs --out (the report to write)")
    check_output(args.out, "out")
    runs = []
    for path in split_list(args.from_json, str, "from-json"):
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--from-json: {path} is not a JSON file written by --json ({e})") from None
    tasks = None if args.tasks in (None, "all") else set(split_list(args.tasks, str, "tasks"))
    rows: dict[tuple, Result] = {}
    for run in runs:
        for row in run["results"]:
            result = Result(**row)
            # task@haystack is its task on another haystack; a run repeated in two files (the full cache) counts once
            if tasks is None or result.task.partition("@")[0] in tasks:
                rows.setdefault(result_key(result), result)
    results = list(rows.values())
    meta = dict(runs[0]["meta"])
    meta["command"] = " + ".join(run["meta"]["command"] for run in runs)
    meta["wall time"] = " + ".join(run["meta"]["wall time"] for run in runs)
    print(report.markdown_table(results))
    model, _ = load_model_arg(args.model, "float32")
    write_outputs(results, meta, model, Path(args.out))
    return 0


def result_key(r: Result) -> tuple:
    return r.engine, r.protocol, r.context_tokens, r.task, r.sample, r.method, r.compression


def write_outputs(results: list[Result], meta: dict, model, out: Path) -> None:
    from lukv_compile.eval.methods import ProfileMissingError, shipped_profile

    report.write_results(results, out, meta)
    accuracy = out.with_name(f"{out.stem}_accuracy.png")
    report.plot_accuracy(results, accuracy)
    print(f"wrote {out}, {accuracy}")
    try:
        budgets = out.with_name(f"{out.stem}_budgets.png")
        report.plot_budgets(shipped_profile(model, "snapkv"), budgets)
        print(f"wrote {budgets}")
    except ProfileMissingError as e:
        print(f"no budget heatmap: {e}")


def main(argv: list[str] | None = None) -> int:
    """`python -m lukv_compile.tools.eval_command eval ...`: the same as `lukv eval ...`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="lukv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"lukv eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
