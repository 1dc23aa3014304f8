"""Public-domain text shipped with the package (see README.md in this folder for provenance)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


@cache
def calibration_text() -> str:
    """~4k SmolLM2 tokens from Northanger Abbey: the profiler's calibration context."""
    return (DATA_DIR / "calibration_northanger.txt").read_text()


@cache
def calibration_questions() -> tuple[dict, ...]:
    """30 cloze questions ({"question", "answer"}) about calibration_text()."""
    return tuple(json.loads((DATA_DIR / "calibration_questions.json").read_text()))


@cache
def haystack_text() -> str:
    """~100 KB from Persuasion, disjoint from the calibration text: filler for the evaluation tasks."""
    return (DATA_DIR / "haystack_persuasion.txt").read_text()
