"""Compress a document once, ask it many questions: saved, loaded, forked and batched.

Builds a document with four hidden facts (where four people live, in the passkey task's filler text),
compresses it once with `lukv compress` (run in-process here; the shell line is printed) and
then does what a service does per request: loads the file, answers each question on its own fork of the
loaded cache, and answers all of them in one batched generate. Prints each answer, whether it holds its
number, and the memory the forks share.

    python examples/compress_once_ask_many.py
    python examples/compress_once_ask_many.py --context 2048 --compression 0.9 --inner inductor

SmolLM2-135M is a small model: with the full cache (plain transformers, printed too) it finds 3 of the 4
facts of the default document.
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch

from lukv_compile import LUKVCache, nbytes_together, questions_batch
from lukv_compile.models import load_model
from lukv_compile.tools import cli
from lukv_compile.tools.compress_command import question_ids

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--context", type=int, default=1024, help="document length in tokens")
parser.add_argument("--compression", type=float, default=0.8, help="fraction of the document's KV removed")
parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
args = parser.parse_args()

model, tokenizer = load_model("smollm2")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
rng = random.Random(0)
# (who, where): four people and the cities they live in
facts = list(zip(["Alice", "Bruno", "Chiara", "Dmitri"], rng.sample(["Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi",
                                                                    "Lima"], 4), strict=True))
repeats = args.context // len(tokenizer.encode(FILLER))
parts = [FILLER * (repeats // len(facts))] * len(facts)
document = "".join(f"{part}{who} lives in {where}. " for part, (who, where) in zip(parts, facts, strict=True))
document += FILLER * 4
folder = Path(tempfile.mkdtemp())
(folder / "doc.txt").write_text(document, encoding="utf-8")
command = ["compress", str(folder / "doc.txt"), "--model", "smollm2", "--out", str(folder / "doc.lukv"),
           "--compression", str(args.compression)]
print("$ lukv " + " ".join(command), flush=True)
if cli.main(command) != 0:
    raise SystemExit("lukv compress failed")

# A request: load the compressed document (refused if saved from another model) and ask.
cache = LUKVCache.load(folder / "doc.lukv", model)
compiled = torch.compile(model, backend="lukv", options={"inner": args.inner})  # the policy lives in the cache
asked = [question_ids(tokenizer, f"Where does {who} live?", f"{who} lives in") for who, _ in facts]
steps = 8


def answer(ids: torch.Tensor) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


forks, one_by_one = [], []
with torch.no_grad():
    for question in asked:
        forks.append(cache.fork())
        out = compiled.generate(torch.cat([cache.token_ids[0], question])[None], cache=forks[-1],
                                max_new_tokens=steps, do_sample=False)
        one_by_one.append(answer(out[0, cache.token_ids.shape[1] + len(question):]))
    inputs = questions_batch(cache.token_ids, asked, tokenizer.pad_token_id)
    out = compiled.generate(**inputs, cache=cache.fork(len(asked)), max_new_tokens=steps, do_sample=False)
batched = [answer(row[inputs["input_ids"].shape[1]:]) for row in out]

for (who, where), single, together in zip(facts, one_by_one, batched, strict=True):
    print(f"{who}: {single!r} ({'found' if where in single else 'missed'} {where}); batched: "
          f"{'same' if together == single else repr(together)}")
with torch.no_grad():  # what the service would answer re-reading the whole document each time
    full = [answer(model.generate(torch.cat([cache.token_ids[0], q])[None], max_new_tokens=steps,
                                  do_sample=False)[0, cache.token_ids.shape[1] + len(q):]) for q in asked]
found = sum(where in single for (_, where), single in zip(facts, one_by_one, strict=True))
found_full = sum(where in single for (_, where), single in zip(facts, full, strict=True))
print(f"found {found} of {len(facts)} (the full cache, plain transformers: {found_full}); batched answers equal one "
      f"by one: {batched == one_by_one}")
shared, apart = nbytes_together(forks), sum(f.nbytes() for f in forks)
print(f"{len(forks)} forks hold {shared / 2**20:.2f} MiB together (one document + {len(forks)} suffixes); as "
      f"separate caches {apart / 2**20:.2f} MiB ({shared / apart:.2f}x)")
