"""Time each phase of LU-KV offline profiling on a real model and print the numbers as JSON.

Phases: context prefill with q/k/v capture and value-output weights (once per profile), scorer
ranking (once per scorer), and per question the oracle (question + K sampled decode steps) and
curves + 99-ratio solve (per scorer). Reports the per-question medians and the implied full-run time.
Usage: python benchmarks/bench_profiling.py [--model smollm2 --context-tokens 4096 --k-max 64 --questions 3]
"""

import argparse
import json
import platform
import statistics
import time

import torch

from lukv_compile.policy.scorers import layer_ropes
from lukv_compile.profiling import (
    calibration_inputs,
    cum_losses,
    eviction_order,
    head_graph,
    layer_scores,
    oracle_importance,
    prune_fractions,
    record_prefill,
)
from lukv_compile.tools.cli_args import load_model_arg

SCORERS = ("snapkv", "keydiff", "expected_attention")
WINDOWS = {"snapkv": 32, "keydiff": 1, "expected_attention": 1}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--k-max", type=int, default=64)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full-questions", type=int, default=30, help="questions of the full run to extrapolate to")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_arg(args.model, "float32")
    calib = calibration_inputs(tokenizer, context_tokens=args.context_tokens, num_questions=args.questions)
    t = calib.context_ids.numel()
    graph = head_graph(model.config)
    record, prefill_s = timed(lambda: record_prefill(model, calib.context_ids))
    orders, rank_s, ropes = {}, {}, layer_ropes(model.config)
    for s in SCORERS:
        scores, rank_s[s] = timed(lambda s=s: layer_scores(s, record.q, record.k, record.v, record.scaling, ropes))
        orders[s] = eviction_order(scores, 4, WINDOWS[s])
    oracle_s, solve_s, steps = [], [], []
    for i, question in enumerate(calib.question_ids):
        result, seconds = timed(lambda q=question, i=i: oracle_importance(
            model, record, q, args.k_max, seed=i, skip_layers=graph.graph["excluded_layers"]))
        oracle_s.append(seconds)
        steps.append(result.generated.numel())
        _, seconds = timed(lambda r=result: [
            prune_fractions(cum_losses(r.importance, orders[s]), t, 4, WINDOWS[s], graph) for s in SCORERS])
        solve_s.append(seconds)
    per_question = statistics.median(oracle_s) + statistics.median(solve_s)
    print(json.dumps({
        "model": args.model, "context_tokens": t, "k_max": args.k_max, "questions_timed": args.questions,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "prefill_record_s": round(prefill_s, 2), "rank_s": {s: round(x, 2) for s, x in rank_s.items()},
        "oracle_s_median": round(statistics.median(oracle_s), 2), "decode_steps": steps,
        "curves_solve_3_scorers_s_median": round(statistics.median(solve_s), 3),
        "estimated_full_run_s": round(prefill_s + sum(rank_s.values()) + args.full_questions * per_question, 1),
        "full_questions": args.full_questions,
    }, indent=1))


if __name__ == "__main__":
    main()
