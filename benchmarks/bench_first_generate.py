"""Time to the first answer of the bare one-liner on SmolLM2, compile included (issue 27's <= 20 s target).

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 .venv/bin/python benchmarks/bench_first_generate.py [--tokens 1024]

Each variant runs in a fresh process (nothing compiled or cached before it): the plain model's generate
(the yardstick), `torch.compile(model, backend="lukv", options={"compression": 0.8})` as the card writes it
(default inner inductor, regional wherever the model allows), and the same with `regional: False` (the whole
model traced, the former default). Prints one JSON line per variant: first generate, second generate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANT = """
import json, time, torch
import lukv_compile
from lukv_compile.models import load_model
torch.manual_seed(0)
model, tokenizer = load_model("smollm2")
ids = torch.randint(100, 40000, (1, {tokens}))
options = {options}
run = model if options is None else torch.compile(model, backend="lukv", options=options)
times = []
for batch in (ids, ids, ids.repeat(2, 1)):  # first call, the same shape again, a new shape (batch of 2)
    start = time.perf_counter()
    run.generate(batch, max_new_tokens={new_tokens}, min_new_tokens={new_tokens}, do_sample=False)
    times.append(round(time.perf_counter() - start, 2))
print(json.dumps({{"first_generate_s": times[0], "second_generate_s": times[1], "batch_of_2_s": times[2]}}))
"""

VARIANTS = {"plain": None, "lukv one-liner (default)": {"compression": 0.8},
            "lukv regional=False (whole model)": {"compression": 0.8, "regional": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    for name, options in VARIANTS.items():
        code = VARIANT.format(tokens=args.tokens, new_tokens=args.new_tokens, options=repr(options))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"variant": name, "prompt_tokens": args.tokens, "new_tokens": args.new_tokens, **row}))


if __name__ == "__main__":
    main()
