"""The `lukv` command line: profile a model, re-solve saved curves, inspect a profile, compress a document,
check a model's properties.

One `add_<command>` function per subcommand registers its arguments and handler; add new
subcommands by writing one and listing it in COMMANDS.

    lukv profile smollm2 --scorer snapkv --out smollm2-snapkv.safetensors
    torchrun --nproc-per-node 2 -m lukv_compile.tools.cli profile smollm2 --scorer snapkv,keydiff \
        --out p-{scorer}.safetensors
    lukv solve p-snapkv.curves.npz --out p-layer.safetensors --scope layer
    lukv inspect p-snapkv.safetensors --compression 0.8 --png keep.png
    lukv compress doc.txt --model smollm2 --out doc.lukv
    lukv check smollm2 --profile lukv_compile/profiles/smollm2-135m-instruct-keydiff.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lukv_compile.eval.report import save_heatmap
from lukv_compile.profile import NUM_RATIOS, RANKINGS, Profile, ProfileError, check_ranking
from lukv_compile.profiles import DEFAULT_RANKINGS
from lukv_compile.profiling.reconstruction import POOL, PROFILE_POOL, PROMPT_FORMATS, check_pool
from lukv_compile.tools import eval_command
from lukv_compile.tools.bench import add_bench, add_demo
from lukv_compile.tools.check_command import add_check
from lukv_compile.tools.cli_args import compression_arg, load_model_arg, non_negative_int, positive_int, positive_ints
from lukv_compile.tools.compress_command import add_compress

DTYPES = ("float32", "bfloat16")
CURVES_SUFFIX = ".curves.npz"


class CommandError(ValueError):
    """A bad command-line argument, reported as `lukv: error: ...` with exit status 2."""


# ---------------------------------------------------------------- profile


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile a model offline and write LU-KV profile file(s)",
                       description="Oracle future utility on the calibration text -> per-head loss curves -> "
                                   "global budget sweep; one .safetensors profile per scorer.")
    p.add_argument("model", help="model name (smollm2, gemma3) or a path to a saved transformers model folder")
    p.add_argument("--scorer", default=DEFAULT_RANKINGS[0],
                   help=f"scorer or comma-separated scorers, from: {', '.join(RANKINGS)} (default "
                        f"{DEFAULT_RANKINGS[0]}, the ranking a cache given no profile prefers; reconstruction: the "
                        "utility of repeating the context, applied by compress_context)")
    p.add_argument("--out", default=None,
                   help="output .safetensors file; with several scorers it must contain {scorer} (default: "
                        "<model>-{scorer}.safetensors in the user's profile folder, $LUKV_PROFILE_DIR or "
                        "~/.cache/lukv_compile/profiles, where a cache given no profile finds it)")
    p.add_argument("--quick", action="store_true",
                   help=f"a first-use profile: {QUICK['questions']} questions, {QUICK['k_max']} sampled steps, a "
                        f"{QUICK['context_tokens'][0]}-token context unless given (32 s for SmolLM2-135M "
                        "on 2 CPU cores; the shipped profiles use 30 questions, 64 steps, 4096 tokens)")
    p.add_argument("--calibration-text", type=Path, default=None,
                   help="UTF-8 text file to calibrate on (default: the shipped Northanger Abbey excerpt)")
    p.add_argument("--calibration-questions", type=Path, default=None,
                   help='JSON file of questions asked after the text: a list of strings or of {"question": ...} '
                        "(default: the shipped 30 cloze questions about the shipped text)")
    p.add_argument("--questions", type=positive_int, default=None, help="use the first N calibration questions "
                   "(default: all)")
    p.add_argument("--k-max", type=positive_int, default=None, help="sampled decode steps per question (default 64)")
    p.add_argument("--context-tokens", type=positive_ints, default=None,
                   help="calibration context length(s) in tokens, comma-separated (default 4096): one length L "
                        "uses the text's first L tokens; with several, the text is cut at the longest and each "
                        "shorter length asks each question after the window of that length holding the passage it "
                        "quotes; every (window, question) counts once in the average")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain",
                   help="plain: the text, then 'Question: ... Answer:' (default); chat: the chat template as the "
                        "evaluation prompts (the text opens the user's turn, the question ends it)")
    p.add_argument("--reconstruction-pool", type=positive_int, default=PROFILE_POOL,
                   help=f"with --scorer reconstruction: the pooling width of the ranking the budgets are solved "
                        f"for, odd (default {PROFILE_POOL}: unpooled, measured better on SmolLM2 than {POOL}, "
                        f"the width compress_context's reconstruction scoring ranks with)")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="budget scope (default global)")
    p.add_argument("--shards", type=positive_int, default=1,
                   help="tensor-parallel shards (contiguous blocks of KV heads): keep each shard's kept tokens "
                        "within 5%% of the others' (default 1; needs --scope global)")
    p.add_argument("--sink", type=non_negative_int, default=4, help="protected first tokens (default 4)")
    p.add_argument("--window", type=non_negative_int, default=None,
                   help="protected last tokens (default: the scorer's own, 32 for snapkv, 1 otherwise)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (question i uses seed + i)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--save-curves", action="store_true",
                   help=f"also write each scorer's per-question loss curves next to its profile ({CURVES_SUFFIX})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_profile)


FULL = {"questions": None, "k_max": 64, "context_tokens": [4096]}
QUICK = {"questions": 8, "k_max": 32, "context_tokens": [2048]}


def apply_preset(args) -> None:
    """Fill --questions / --k-max / --context-tokens not given from the --quick or the full preset."""
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def default_out(model: str, shards: int) -> str:
    """The profile's file in the user's profile folder (made if missing), for a model name or folder."""
    from lukv_compile import models
    from lukv_compile.profiles import profile_file_name, user_profile_dir

    name = models.MODELS[model].model_id if model in models.MODELS else str(Path(model).resolve())
    folder = user_profile_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / profile_file_name(name, "{scorer}", shards))


def parse_scorers(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CommandError(f"--scorer is empty; allowed: {', '.join(RANKINGS)}")
    for name in names:
        check_ranking(name)
    if len(set(names)) != len(names):
        raise CommandError(f"--scorer lists a scorer twice: {text!r}")
    return names


def output_paths(out: str, scorers: list[str]) -> dict[str, Path]:
    if len(scorers) > 1 and "{scorer}" not in out:
        raise CommandError(f"--out {out!r} must contain {{scorer}} when profiling several scorers")
    paths = {s: Path(out.replace("{scorer}", s)) for s in scorers}
    for path in paths.values():
        if not path.parent.is_dir():
            raise CommandError(f"--out: folder {path.parent} does not exist")
    return paths


def run_profile(args) -> None:
    import torch

    from lukv_compile.profiling.run import check_scope, init_distributed, profile_scorers

    scorers = parse_scorers(args.scorer)
    check_scope(args.scope, args.shards)
    check_pool(args.reconstruction_pool)
    apply_preset(args)
    paths = output_paths(args.out or default_out(args.model, args.shards), scorers)
    context, questions, source = calibration_files(args.calibration_text, args.calibration_questions)
    if args.questions is not None and args.questions > len(questions):
        raise CommandError(f"--questions {args.questions}: only {len(questions)} calibration questions exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed()
    model, tokenizer = load_model_arg(args.model, args.dtype)
    start = time.perf_counter()
    results = profile_scorers(model, tokenizer, scorers, sink=args.sink, window=args.window, k_max=args.k_max,
                              context=context, questions=questions, source=source,
                              context_tokens=args.context_tokens, num_questions=args.questions, scope=args.scope,
                              seed=args.seed, keep_curves=args.save_curves, progress=not args.no_progress,
                              shards=args.shards, prompt_format=args.prompt_format,
                              reconstruction_pool=args.reconstruction_pool)
    elapsed = time.perf_counter() - start
    if rank == 0:
        for scorer, result in results.items():
            result.profile.save(paths[scorer])
            print(f"wrote {paths[scorer]} ({scorer}, {elapsed:.1f} s on {world} process(es), "
                  f"{torch.get_num_threads()} thread(s) each)")
            if result.curves is not None:
                curves_path = paths[scorer].with_suffix(CURVES_SUFFIX)
                save_curves(curves_path, result.curves, result.profile)
                print(f"wrote {curves_path}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def calibration_files(text_path: Path | None, questions_path: Path | None) -> tuple[str | None, list[str], dict]:
    """(context or None for the shipped text, questions, the files' names for the profile's record); the
    shipped questions are about the shipped text, so a custom text needs its own questions."""
    from lukv_compile.data import calibration_questions, read_questions

    if text_path is not None and questions_path is None:
        raise CommandError(f"--calibration-text {text_path} needs --calibration-questions: the shipped questions "
                           "are about the shipped text")
    context = None
    if text_path is not None:
        try:
            context = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"--calibration-text {text_path}: cannot read it as UTF-8 text ({error})") from None
        if not context.strip():
            raise CommandError(f"--calibration-text {text_path} is empty")
    try:
        questions = ([item["question"] for item in calibration_questions()] if questions_path is None
                     else read_questions(questions_path))
    except ValueError as error:
        raise CommandError(f"--calibration-questions: {error}") from None
    source = {name: path.name for name, path in (("text_file", text_path), ("questions_file", questions_path))
              if path is not None}
    return context, questions, source


def save_curves(path: Path, curves: np.ndarray, profile: Profile) -> None:
    calibration = json.loads(profile.calibration)
    meta = dict(profile.metadata(), context_len=calibration["context_tokens"] + calibration.get("prefix_tokens", 0))
    np.savez_compressed(path, curves=curves, meta=np.array(json.dumps(meta)))


# ---------------------------------------------------------------- solve


def add_solve(sub) -> None:
    p = sub.add_parser("solve", help="re-solve saved loss curves (from `profile --save-curves`) into a profile")
    p.add_argument("curves", help=f"curves file written by `lukv profile --save-curves` (*{CURVES_SUFFIX})")
    p.add_argument("--out", required=True, help="output .safetensors profile")
    p.add_argument("--scope", choices=("global", "layer"), default=None,
                   help="budget scope (default: the one the curves were profiled with)")
    p.set_defaults(func=run_solve)


def load_curves(path: str) -> tuple[np.ndarray, dict]:
    if not Path(path).is_file():
        raise CommandError(f"{path}: no such curves file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["curves"], json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise CommandError(f"{path}: not a curves file written by `lukv profile --save-curves` ({e})") from e


def run_solve(args) -> None:
    from lukv_compile.profiling.run import mean_fractions, prune_fractions
    from lukv_compile.solver import build_head_graph

    out = Path(args.out)
    if not out.parent.is_dir():
        raise CommandError(f"--out: folder {out.parent} does not exist")
    curves, meta = load_curves(args.curves)
    scope = args.scope or meta["scope"]
    layers, heads = meta["num_layers"], meta["num_kv_heads"]
    if curves.ndim != 3 or curves.shape[1] != layers * heads:
        raise CommandError(f"{args.curves}: curves shape {curves.shape} does not match {layers} x {heads} heads")
    # The graph the curves were profiled on: same excluded layers and shards.
    excluded = meta.get("excluded_layers", [])
    shards = json.loads(meta["calibration"]).get("shards", 1)
    graph = build_head_graph(layers, heads, meta["model"].get("num_q_heads", heads), excluded, shards)
    total = sum(prune_fractions(c, meta["context_len"], meta["sink"], meta["window"], graph, scope) for c in curves)
    profile = Profile(mean_fractions(total, curves.shape[0]), scorer=meta["scorer"], sink=meta["sink"],
                      window=meta["window"], model=meta["model"], fingerprint=meta["fingerprint"],
                      calibration=meta["calibration"], scope=scope, excluded_layers=tuple(excluded))
    profile.save(out)
    print(f"wrote {out} ({meta['scorer']}, scope {scope}, {curves.shape[0]} question(s))")


# ---------------------------------------------------------------- inspect


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a profile: per-layer keep fractions at one compression")
    p.add_argument("profile", help=".safetensors profile file")
    p.add_argument("--compression", type=compression_arg, default=0.8,
                   help="global compression ratio in [0, 1) (default 0.8, i.e. keep 20%%)")
    p.add_argument("--png", default=None, help="also write a layers x heads heatmap of keep fractions")
    p.set_defaults(func=run_inspect)


def keep_table(profile: Profile, compression: float) -> str:
    """Keep fractions per layer; excluded (sliding, exact) layers are marked and left out of `all`."""
    keep = 1.0 - profile.fractions(compression)
    per_head = profile.num_kv_heads <= 8
    header = f"{'layer':>5} {'mean':>6} {'min':>6} {'max':>6}" + ("  per KV head" if per_head else "")
    rows = [header]
    for layer, row in enumerate(keep):
        line = f"{layer:>5} {row.mean():6.3f} {row.min():6.3f} {row.max():6.3f}"
        line += "  " + " ".join(f"{x:.3f}" for x in row) if per_head else ""
        rows.append(line + ("  (excluded: sliding-window, exact)" if layer in profile.excluded_layers else ""))
    budgeted = np.delete(keep, list(profile.excluded_layers), axis=0)
    rows.append(f"{'all':>5} {budgeted.mean():6.3f} {budgeted.min():6.3f} {budgeted.max():6.3f}")
    return "\n".join(rows)


def run_inspect(args) -> None:
    if args.png is not None and not Path(args.png).parent.is_dir():
        raise CommandError(f"--png: folder {Path(args.png).parent} does not exist")
    profile = Profile.load(args.profile)
    model = profile.model.get("model_id", "unknown model")
    print(f"{args.profile}: {model}, scorer {profile.scorer}, sink {profile.sink}, window {profile.window}, "
          f"scope {profile.scope}, {profile.num_layers} layers x {profile.num_kv_heads} KV heads, {NUM_RATIOS} ratios")
    if profile.excluded_layers:
        print(f"excluded (no budget, left exact): layers {list(profile.excluded_layers)}")
    print(f"calibration: {profile.calibration}")
    print(f"keep fractions at compression {args.compression:g}:")
    print(keep_table(profile, args.compression))
    if args.png is not None:
        save_heatmap(profile, args.compression, Path(args.png))
        print(f"wrote {args.png}")


# ---------------------------------------------------------------- main

COMMANDS = (add_profile, add_solve, add_inspect, eval_command.add_parser, add_demo, add_bench, add_compress,
            add_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lukv", description="LU-KV per-head KV-cache eviction tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The command's own process: models load from local folders, so a hub lookup would only wait for a network
    # that is not there. (The library itself never sets this: importing it changes no environment variable.)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ProfileError) as e:  # CommandError, ProfileError and argument checks are ValueErrors
        print(f"lukv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
