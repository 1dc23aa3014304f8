"""A hand-written greedy loop over the compiled model with an explicit LUKVCache, over two chat turns.

Shows the explicit form: build a `LUKVCache` yourself, compile the model with the lukv backend (the
cache owns the eviction policy, the backend options only choose the inner compiler), and call the
compiled model with `cache=cache` for any number of new tokens at a time. No sizing up front: the
cache's storage grows by itself, and positions come from `cache.get_seq_length()`.

    phase 1  the first user turn (a ~1k-token document with a passkey) in one forward: exact attention,
             then every KV head is cut to its own budget
    phase 2  greedy decoding, one token per forward
    phase 3  the second user turn appended in one forward (with --evict turn, the default here, the
             cache is cut back to budget after it; with --evict prompt only the first forward evicts)
    phase 4  greedy decoding of the second answer

The bytes the cache holds are printed after each phase, next to the uncompressed cache's.

    python examples/explicit_cache_loop.py
    python examples/explicit_cache_loop.py --context 4096 --compression 0.9 --inner inductor
"""

import argparse

import torch

import lukv_compile
from lukv_compile.eval.methods import profile_path
from lukv_compile.models import eos_token_ids, load_model
from lukv_compile.tools.bench import passkey_prompt

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--context", type=int, default=1024, help="document length in tokens")
parser.add_argument("--compression", type=float, default=0.8, help="fraction of the KV removed at each eviction")
parser.add_argument("--scorer", default="window_expected_attention",
                    choices=["snapkv", "keydiff", "window_expected_attention"],
                    help="which shipped LU-KV profile to use")
parser.add_argument("--evict", default="turn", choices=["prompt", "turn", "always"], help="when to evict")
parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
parser.add_argument("--max-new-tokens", type=int, default=24, help="per answer")
args = parser.parse_args()

model, tokenizer = load_model("smollm2")
stop_ids = eos_token_ids(model, tokenizer)

cache = lukv_compile.LUKVCache(model.config, profile=profile_path(model, args.scorer), compression=args.compression,
                               evict=args.evict)
compiled = torch.compile(model, backend="lukv", options={"inner": args.inner})


def report(phase):
    held = cache.nbytes()
    full = lukv_compile.full_cache_nbytes(model.config, 1, cache.get_seq_length(), model.dtype)
    print(f"{phase:<22} {cache.get_seq_length():>5} tokens seen  KV held {held / 2**20:6.2f} MiB  "
          f"uncompressed {full / 2**20:6.2f} MiB  ({held / full:.3f}x)", flush=True)


def greedy(logits):
    """Greedy decoding from the last forward's logits; every token but a stop token is fed to the model."""
    tokens = []
    for _ in range(args.max_new_tokens):
        next_id = int(logits[0, -1].argmax())
        if next_id in stop_ids:
            break
        tokens.append(next_id)
        logits = compiled(input_ids=torch.tensor([[next_id]]), cache=cache).logits
    return tokenizer.decode(tokens, skip_special_tokens=True)


document, answers = passkey_prompt(tokenizer, args.context)
messages = [{"role": "user", "content": document}]
turn1 = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
ids = tokenizer(turn1, add_special_tokens=False, return_tensors="pt").input_ids

with torch.no_grad():
    logits = compiled(input_ids=ids, cache=cache).logits
    report("1. first turn")
    answer1 = greedy(logits)
    report("2. first answer")

    # The second turn is the conversation's new text: the end of the answer's turn, the user's next
    # message and the assistant header, all in one forward.
    messages += [{"role": "assistant", "content": answer1},
                 {"role": "user", "content": "Thanks. Now repeat the pass key twice, separated by a comma."}]
    conversation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turn2 = conversation[conversation.index(answer1, len(turn1)) + len(answer1):]
    ids = tokenizer(turn2, add_special_tokens=False, return_tensors="pt").input_ids
    logits = compiled(input_ids=ids, cache=cache).logits
    report("3. second turn")
    answer2 = greedy(logits)
    report("4. second answer")

print(f"passkey {answers[0]}; compression {args.compression}, evict {args.evict!r}", flush=True)
print(f"answer 1: {answer1.strip()!r}", flush=True)
print(f"answer 2: {answer2.strip()!r}", flush=True)
