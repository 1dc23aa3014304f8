"""One line: compress a Hugging Face model's KV cache with LU-KV by compiling it with the lukv backend.

Loads SmolLM2-135M-Instruct, hides a passkey in a ~1k-token prompt, compiles the model with
`torch.compile(model, backend="lukv", options=...)` and generates. `generate` builds a LUKVCache
itself: after the prompt every KV head keeps only its own budget of tokens (compression 0.8 keeps
20% on average), and the script prints the answer and the bytes the cache really holds against the
uncompressed cache.

    python examples/one_line.py                      # aot_eager inner compiler (quick on CPU)
    python examples/one_line.py --inner inductor --context 4096 --compression 0.5
"""

import argparse
import time

import torch

import lukv_compile
from lukv_compile.models import load_model
from lukv_compile.tools.bench import passkey_prompt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2", help="smollm2 or gemma3")
parser.add_argument("--context", type=int, default=1024, help="prompt length in tokens")
parser.add_argument("--compression", type=float, default=0.8, help="fraction of the prompt's KV removed")
parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"],
                    help="compiler the lukv backend hands the rewritten graph to")
parser.add_argument("--profile", default=None, help="profile file or 'uniform' (default: the model's own, found)")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

model, tokenizer = load_model(args.model)
prompt, answers = passkey_prompt(tokenizer, args.context)
inputs = tokenizer(prompt, return_tensors="pt")
prompt_len = inputs.input_ids.shape[1]

# Per-head budgets: None finds this model's own LU-KV profile (shipped, or made with `lukv profile`) by its
# config fingerprint and says which; a path or a Profile picks one; "uniform" gives every head the same share.
profile = args.profile

# The one line. (In place instead: model.compile(backend="lukv", options={...}); model.generate(...).)
compiled = torch.compile(model, backend="lukv",
                         options={"compression": args.compression, "profile": profile, "inner": args.inner})

start = time.perf_counter()
with torch.no_grad():
    out = compiled.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                            return_dict_in_generate=True)
seconds = time.perf_counter() - start

answer = tokenizer.decode(out.sequences[0, prompt_len:], skip_special_tokens=True).strip()
held = out.cache.nbytes()
full = lukv_compile.full_cache_nbytes(model.config, 1, out.sequences.shape[1] - 1, model.dtype)
print(f"prompt: {prompt_len} tokens, passkey {answers[0]}; compression {args.compression}, "
      f"{out.cache.profile.scorer} ranking on {out.cache.profile.scope} budgets", flush=True)
print(f"answer: {answer!r} ({'found' if all(a in answer for a in answers) else 'missed'} the passkey)", flush=True)
print(f"KV cache: {held / 2**20:.2f} MiB held vs {full / 2**20:.2f} MiB uncompressed ({held / full:.3f}x)",
      flush=True)
print(f"generate: {seconds:.1f} s including compilation (inner {args.inner})", flush=True)
