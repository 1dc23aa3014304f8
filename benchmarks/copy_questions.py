"""Copy-style calibration questions about the shipped calibration text (issue 10 study).

The shipped questions are cloze questions whose answers (a few names) recur all over the text. These ask
instead for a sentence of the text to be continued word for word from its first words, so answering means
finding one place in the context and copying from it, as the retrieval tasks do, without using the
evaluation's own task generators or filler. Sentences of >= 14 words, without quotation marks, spread
evenly over the text. Writes the shipped questions' JSON format for `lukv profile --calibration-questions`.

    python benchmarks/copy_questions.py --out /tmp/copy_questions.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from lukv_compile.data import calibration_text

SENTENCE = re.compile(r'[A-Z][^.!?"]*[.!?]')
QUESTION = 'Continue this sentence of the story word for word: "{start}"'


def copy_questions(text: str, count: int = 30, quoted_words: int = 8, min_words: int = 14) -> list[dict]:
    """`count` questions quoting the first `quoted_words` words of sentences spread evenly over `text`."""
    sentences = [m.group(0).split() for m in SENTENCE.finditer(text)]
    sentences = [words for words in sentences if len(words) >= min_words]
    if len(sentences) < count:
        raise ValueError(f"the text has {len(sentences)} sentences of >= {min_words} words, fewer than {count}")
    picked = [sentences[round(i * (len(sentences) - 1) / max(count - 1, 1))] for i in range(count)]
    return [{"question": QUESTION.format(start=" ".join(words[:quoted_words])),
             "answer": " ".join(words[quoted_words:])} for words in picked]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=30)
    args = p.parse_args(argv)
    questions = copy_questions(calibration_text(), args.count)
    with open(args.out, "w") as f:
        json.dump(questions, f, indent=1)
    print(f"wrote {len(questions)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
