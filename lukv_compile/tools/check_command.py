"""`lukv check MODEL [--profile FILE]`: lukv's property suite on a model, as one quick command for CI.

Runs `lukv_compile.testing.PROPERTIES` in order (the touch-point canary first, before the model loads) with a
few hypothesis examples each, one progress line per property, then a summary table; exit status 1 when any
property fails (its message names the inputs and what differed), 0 when all hold.
"""

from __future__ import annotations

import sys
import time

from lukv_compile.tools.cli_args import positive_int


def add_check(sub) -> None:
    p = sub.add_parser("check", help="prove a model stays exact, compressed and compiled once under lukv (for CI)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="a saved transformers model folder, a name lukv knows (smollm2, gemma3) or "
                                 "package.module:factory")
    p.add_argument("--profile", default=None, help="the model's LU-KV profile file (default: uniform budgets)")
    p.add_argument("--max-examples", type=positive_int, default=3, help="hypothesis examples per property (default 3)")
    p.add_argument("--inner", default=None, choices=("inductor", "aot_eager", "eager"),
                   help="the compiler after lukv's pass (default: lukv's default, inductor)")
    p.set_defaults(func=run_check)


def run_check(args) -> None:
    from lukv_compile.testing import PROPERTIES, PropertyFailed, check_property, load_subject

    results, subject = [], None
    for i, name in enumerate(PROPERTIES, 1):
        start = time.perf_counter()
        try:
            if name != "touch_points" and subject is None:
                subject = load_subject(args.model, args.profile, args.max_examples, args.inner)
            check_property(name, subject)
            outcome, detail = "ok", ""
        except PropertyFailed as e:
            outcome, detail = "FAILED", str(e)
        seconds = time.perf_counter() - start
        results.append((name, outcome, seconds))
        print(f"[{i}/{len(PROPERTIES)}] {name}: {outcome} ({seconds:.1f} s)", flush=True)
        if detail:
            print(detail, flush=True)
        if name == "touch_points" and outcome != "ok":
            print("the model properties were not run: lukv's touch-points broke", flush=True)
            break
    width = max(len(name) for name in PROPERTIES)
    print(f"\n{'property':<{width}}  result  seconds")
    for name, outcome, seconds in results:
        print(f"{name:<{width}}  {outcome:<6}  {seconds:7.1f}")
    failed = [name for name, outcome, _ in results if outcome != "ok"]
    print(f"{len(results) - len(failed)} of {len(PROPERTIES)} properties hold" + (
        f"; failed: {', '.join(failed)}" if failed else ""))
    if failed or len(results) < len(PROPERTIES):
        sys.exit(1)
