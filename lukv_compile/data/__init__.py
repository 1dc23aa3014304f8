"""Text shipped with the package: public domain, or written for it (see README.md in this folder for provenance)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
# Filler for the evaluation tasks, all disjoint from the calibration text: ~100 KB from Persuasion, then
# ~2k words each of Python source, a licence agreement and a team chat, written for this project.
HAYSTACKS = ("persuasion", "code", "legal", "chat")


@cache
def calibration_text() -> str:
    """~4k SmolLM2 tokens from Northanger Abbey: the profiler's calibration context."""
    return (DATA_DIR / "calibration_northanger.txt").read_text()


@cache
def calibration_questions() -> tuple[dict, ...]:
    """30 cloze questions ({"question", "answer"}) about calibration_text()."""
    return tuple(json.loads((DATA_DIR / "calibration_questions.json").read_text()))


def read_questions(path: str | Path) -> list[str]:
    """Calibration questions from a JSON file: a list of strings, or of {"question": ...} objects (the shipped
    calibration_questions.json format). Raises ValueError naming the file and what is allowed."""
    path = Path(path)
    allowed = 'a JSON list of question strings or of {"question": "..."} objects'
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such calibration questions file: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error}); expected a file holding {allowed}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}); expected {allowed}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} holds no questions; expected {allowed}")
    questions = [item.get("question") if isinstance(item, dict) else item for item in items]
    bad = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if bad:
        raise ValueError(f"{path}: items {bad[:5]} are not non-empty questions; expected {allowed}")
    return questions


@cache
def haystack_text(name: str = "persuasion") -> str:
    """The haystack text `name` (one of HAYSTACKS). Raises ValueError naming the allowed ones."""
    if name not in HAYSTACKS:
        raise ValueError(f"unknown haystack {name!r}; allowed: {', '.join(HAYSTACKS)}")
    return (DATA_DIR / f"haystack_{name}.txt").read_text()
