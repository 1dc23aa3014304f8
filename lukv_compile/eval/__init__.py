"""Evaluation: RULER-style long-context tasks (tasks.py) and the harness that runs them."""

from lukv_compile.eval.tasks import TASKS, Sample, make_samples, score

__all__ = ["TASKS", "Sample", "make_samples", "score"]
