"""Rebuild the public-domain text files in lukv_compile/data/ from Debian's r-cran-janeaustenr.

Provenance record, not part of the package. Needs: apt-get install -y r-cran-janeaustenr, PyPI rdata.
    python scripts/extract_austen.py [--out lukv_compile/data]

The R package stores each novel as a character vector (one element per printed line) in an R lazy-load
database: Rdata.rdx is a gzipped serialized index {name: (offset, length)}, and each Rdata.rdb chunk is
a 4-byte big-endian length followed by a zlib stream of one serialized R object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import warnings
import zlib
from collections import Counter
from pathlib import Path

import rdata

JANEAUSTENR_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")
CALIBRATION_CHARS = 18_500  # ~4k SmolLM2 tokens
HAYSTACK_CHARS = 100_000
NUM_QUESTIONS = 30
# Capitalised words that are not names even when they appear mid-sentence.
NOT_NAMES = {"Mr", "Mrs", "Miss", "Dr", "Sir", "Lady", "Lord", "I", "CHAPTER", "Chapter", "God", "Heaven"}


def _unserialize(blob: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no RDS header
        return rdata.conversion.convert(rdata.parser.parse_data(blob, expand_altrep=True))


def read_novel(name: str) -> list[str]:
    index = _unserialize(gzip.decompress((JANEAUSTENR_DATA / "Rdata.rdx").read_bytes()))
    offset, length = (int(x) for x in index["variables"][name])
    with open(JANEAUSTENR_DATA / "Rdata.rdb", "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    return [str(line) for line in _unserialize(zlib.decompress(chunk[4:]))]


def paragraphs(lines: list[str]) -> list[str]:
    """Join printed lines into paragraphs (blank lines separate them) and normalise whitespace."""
    out, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def excerpt(paras: list[str], start: str, max_chars: int) -> str:
    """Whole paragraphs from the first one equal to `start`, stopping before `max_chars` is passed."""
    first = paras.index(start)
    kept, size = [], 0
    for para in paras[first:]:
        if size + len(para) + 2 > max_chars:
            break
        kept.append(para)
        size += len(para) + 2
    return "\n\n".join(kept) + "\n"


def sentences(text: str) -> list[str]:
    """Sentences within each paragraph; a full stop after a title does not end one."""
    end = r"(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<=[.!?])\s+(?=[\"'A-Z_])"
    return [s.strip() for para in text.split("\n\n") for s in re.split(end, para) if s.strip()]


def names_in(text: str) -> set[str]:
    """Capitalised words used mid-sentence (or after a title) twice or more, never written in lower case."""
    lower_words = set(re.findall(r"\b[a-z]+\b", text))
    # Lookbehinds, so "Mrs. Morland" still counts after "and Mrs" was seen as a candidate itself.
    mid_sentence = r"(?:(?<=[a-z,;:] )|(?<=Mrs\. )|(?<=Mr\. )|(?<=Miss ))([A-Z][a-z]+)\b"
    counts = Counter(re.findall(mid_sentence, text))
    return {w for w, c in counts.items() if c >= 2 and w.lower() not in lower_words and w not in NOT_NAMES}


def cloze_questions(text: str, n: int) -> list[dict]:
    """Blank out one name in n sentences spread evenly over the text; the answer is that name.

    The blanked name occurs once in its sentence, so the blank has a single right answer in the text.
    """
    names = names_in(text)
    candidates = []
    for sentence in sentences(text):
        if not 40 <= len(sentence) <= 500:
            continue
        found = re.findall(r"\b[A-Z][a-z]+\b", sentence)
        once = [w for w in found if w in names and found.count(w) == 1]
        if once:
            candidates.append((sentence, once[0]))
    if len(candidates) < n:
        raise ValueError(f"only {len(candidates)} cloze candidates, need {n}")
    picks = [candidates[i * len(candidates) // n] for i in range(n)]
    return [
        {
            "question": f'Which name is missing from this sentence of the story? "{s.replace(name, "____")}"',
            "answer": name,
        }
        for s, name in picks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "lukv_compile" / "data")
    out = parser.parse_args().out
    calibration = excerpt(paragraphs(read_novel("northangerabbey")), "CHAPTER 1", CALIBRATION_CHARS)
    haystack = excerpt(paragraphs(read_novel("persuasion")), "Chapter 1", HAYSTACK_CHARS)
    (out / "calibration_northanger.txt").write_text(calibration)
    (out / "haystack_persuasion.txt").write_text(haystack)
    questions = cloze_questions(calibration, NUM_QUESTIONS)
    (out / "calibration_questions.json").write_text(json.dumps(questions, indent=1) + "\n")
    print(f"calibration {len(calibration)} chars, haystack {len(haystack)} chars, {len(questions)} questions")


if __name__ == "__main__":
    main()
