"""kvpress's SnapKV and AdaKV presses against plain transformers, on the prompts `lukv bench` uses (issue 11).

kvpress 0.5.5 needs transformers < 5.3 and this project pins a later one, so it runs in a venv of its own
and the two sides meet through prompt files. In the project's venv, write the prompts:

    .venv/bin/python benchmarks/bench_kvpress.py write-prompts --out /tmp/kvpress-prompts --contexts 1024,4096

In a venv with torch==2.13.0 and kvpress==0.5.5 (pip resolves transformers 5.2.x), time the presses:

    python3 -m venv /tmp/kvpvenv && /tmp/kvpvenv/bin/pip install torch==2.13.0 kvpress==0.5.5
    /tmp/kvpvenv/bin/python benchmarks/bench_kvpress.py run --prompts /tmp/kvpress-prompts \\
        --model-dir ~/.cache/lukv_compile/models/smollm2 --json /tmp/kvpress.json

`run` loads the same SmolLM2 weights (`lukv_compile.models.cache_dir`, which `lukv demo` fills) three times
and, per prompt, prefills each (the presses compress inside their prefill), then decodes --steps tokens
with the argmax fed back, interleaved step by step; medians after the first two steps. Like `lukv bench`,
ratios are against plain transformers measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

WARMUP_STEPS = 2


def write_prompts(args) -> None:
    from lukv_compile.models import load_tokenizer
    from lukv_compile.tools.bench import passkey_prompt

    tokenizer = load_tokenizer("smollm2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for context in (int(c) for c in args.contexts.split(",")):
        prompt, _ = passkey_prompt(tokenizer, context)
        (out / f"passkey-{context}.txt").write_text(prompt)
        print(f"wrote {out / f'passkey-{context}.txt'} ({len(tokenizer(prompt).input_ids)} tokens)")


def presses(compression: float) -> dict:
    from kvpress import AdaKVPress, SnapKVPress

    return {"kvpress_snapkv": SnapKVPress(compression_ratio=compression),
            "kvpress_adakv_snapkv": AdaKVPress(SnapKVPress(compression_ratio=compression))}


def step(model, cache, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return token, time.perf_counter() - start


def held_tokens(cache) -> int:
    """Key slots the cache holds, over all layers and heads (AdaKV keeps them all and masks)."""
    return sum(layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2] for layer in cache.layers)


def time_prompt(models: dict, named_presses: dict, ids: torch.Tensor, steps: int) -> dict:
    from transformers import DynamicCache

    state, prefill = {}, {}
    for name, model in models.items():
        cache = DynamicCache(config=model.config)
        if name in named_presses:
            with named_presses[name](model):
                state[name] = step(model, cache, ids)[0], cache
        else:
            state[name] = step(model, cache, ids)[0], cache
        # the timed prefill: a second one on a fresh cache (the first warmed the kernels)
        fresh = DynamicCache(config=model.config)
        start = time.perf_counter()
        if name in named_presses:
            with named_presses[name](model):
                step(model, fresh, ids)
        else:
            step(model, fresh, ids)
        prefill[name] = time.perf_counter() - start
    decode = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            token, cache = state[name]
            token, seconds = step(model, cache, token)
            state[name] = token, cache
            decode[name].append(seconds)
    ms = {name: 1000 * statistics.median(times[WARMUP_STEPS:]) for name, times in decode.items()}
    held = {name: held_tokens(cache) for name, (_, cache) in state.items()}
    return {"tokens": ids.shape[1], "prefill_s": prefill, "decode_ms": ms,
            "tokens_per_s_ratio_vs_plain": {name: ms["plain"] / ms[name] for name in ms},
            "key_slots_vs_plain": {name: held[name] / held["plain"] for name in held}}


def run(args) -> None:
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    names = ["plain", *presses(args.compression)]
    models = {name: AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                         attn_implementation="sdpa").eval() for name in names}
    named_presses = presses(args.compression)
    rows = []
    for path in sorted(Path(args.prompts).glob("passkey-*.txt"), key=lambda p: int(p.stem.split("-")[1])):
        ids = tokenizer(path.read_text(), return_tensors="pt").input_ids
        row = {"prompt": path.name, **time_prompt(models, named_presses, ids, args.steps)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the command without this machine's paths (prompt and model folders)
    command = (f"benchmarks/bench_kvpress.py run --compression {args.compression} --steps {args.steps} "
               f"--threads {args.threads}")
    meta = {"command": command, "threads": args.threads, "compression": args.compression,
            "steps": args.steps, "torch": torch.__version__, "transformers": transformers.__version__,
            "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-prompts", help="in the project's venv: the bench prompts as text files")
    w.add_argument("--out", required=True)
    w.add_argument("--contexts", default="1024,4096")
    r = sub.add_parser("run", help="in the kvpress venv: time plain, SnapKV and AdaKV presses")
    r.add_argument("--prompts", required=True)
    r.add_argument("--model-dir", required=True, help="the SmolLM2 safetensors folder (lukv_compile.models.cache_dir)")
    r.add_argument("--compression", type=float, default=0.8)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--json")
    args = p.parse_args(argv)
    write_prompts(args) if args.command == "write-prompts" else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
