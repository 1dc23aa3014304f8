"""`lukv demo` and `lukv bench`: the real model, compressed, measured against its own full cache.

bench: for each context length, in one process and interleaved step by step, the LU-KV compiled model
(compression c) and the uncompressed compiled baseline (transformers' StaticCache + inductor, what a
user compiles today) decode the same prompt; we report KV bytes, the median decode-step latency and
tokens/s of each, and the ratios. The decode attention op alone is timed against full-cache SDPA on
the same shapes.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lukv_compile.cache import LUKVCache, RaggedLayer, full_cache_nbytes
from lukv_compile.kernels.reference import segment_attention
from lukv_compile.profile import Profile


def shipped_profile(model) -> Profile:
    """The LU-KV SnapKV profile shipped for this model; uniform SnapKV when there is none (said aloud)."""
    from lukv_compile.eval.methods import ProfileMissingError, layers_and_heads
    from lukv_compile.eval.methods import shipped_profile as lukv_profile

    try:
        return lukv_profile(model, "snapkv")
    except ProfileMissingError as e:
        print(f"{e}: using the uniform SnapKV allocation")
        return Profile.uniform(*layers_and_heads(model))


def passkey_prompt(tokenizer, context_tokens: int) -> tuple[str, list[str]]:
    """A passkey-retrieval prompt of about `context_tokens` tokens (the eval task's first sample)."""
    from lukv_compile.eval.tasks import make_samples

    sample = make_samples("passkey", tokenizer, context_tokens, 1)[0]
    return f"{sample.context}\n\n{sample.question}\n{sample.answer_prefix}", sample.answers


def run_demo(args) -> None:
    from lukv_compile.models import load_model

    say(f"loading {args.model} ...")
    model, tokenizer = load_model(args.model)
    prompt, answers = passkey_prompt(tokenizer, args.context)
    inputs = tokenizer(prompt, return_tensors="pt")
    profile = shipped_profile(model)
    compiled = torch.compile(model, backend="lukv",
                             options={"profile": profile, "compression": args.compression, "inner": args.inner})
    say(f"generating from a {inputs.input_ids.shape[1]}-token prompt (the first call compiles; "
        f"inner compiler {args.inner}) ...")
    start = time.perf_counter()
    out = compiled.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    answer = tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    tokens = out.sequences.shape[1] - 1
    full = full_cache_nbytes(model.config, 1, tokens, model.dtype)
    found = all(a in answer for a in answers)
    say(f"prompt: {inputs.input_ids.shape[1]} tokens with a passkey inside; compression {args.compression}")
    say(f"answer: {answer.strip()!r}  ({'found' if found else 'missed'} the passkey {', '.join(answers)})")
    say(f"KV cache: {out.cache.nbytes() / 2**20:.2f} MiB vs {full / 2**20:.2f} MiB uncompressed "
          f"({out.cache.nbytes() / full:.3f}x); generate took {seconds:.1f} s including compilation")


def say(message: str) -> None:
    print(message, flush=True)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def decode_step(model, cache, token) -> torch.Tensor:
    return model(input_ids=token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)


def bench_context(model, baseline, tokenizer, profile, context: int, compression: float, steps: int) -> dict:
    from transformers import StaticCache

    ids = tokenizer(passkey_prompt(tokenizer, context)[0], return_tensors="pt").input_ids[:, -context:]
    cache = LUKVCache(model.config, profile=profile, compression=compression)
    static = StaticCache(config=model.config, max_cache_len=context + steps + 2)
    with torch.no_grad():
        token = decode_step(model, cache, ids)
        base_token = decode_step(baseline, static, ids)
        times = {"lukv": [], "full": []}
        for step in range(steps):
            start = time.perf_counter()
            token = decode_step(model, cache, token)
            times["lukv"].append(time.perf_counter() - start)
            start = time.perf_counter()
            base_token = decode_step(baseline, static, base_token)
            times["full"].append(time.perf_counter() - start)
    warm = {name: t[2:] for name, t in times.items()}  # the first steps compile
    full_bytes = full_cache_nbytes(model.config, 1, context + steps + 2, model.dtype)
    lukv_ms, full_ms = median_ms(warm["lukv"]), median_ms(warm["full"])
    return {
        "context": context, "compression": compression, "decode_steps": len(warm["lukv"]),
        "kv_bytes_lukv": cache.nbytes(), "kv_bytes_full": full_bytes, "kv_bytes_ratio": cache.nbytes() / full_bytes,
        "decode_ms_lukv": lukv_ms, "decode_ms_full": full_ms,
        "tokens_per_s_lukv": 1000 / lukv_ms, "tokens_per_s_full": 1000 / full_ms,
        "decode_speedup": full_ms / lukv_ms,
        **bench_attention(cache, model.config, context),
    }


def bench_attention(cache: LUKVCache, config, context: int, repeats: int = 15) -> dict:
    """The decode attention op alone over every layer's real ragged storage vs full-cache SDPA, interleaved."""
    hq, h, d = config.num_attention_heads, config.num_key_value_heads, cache.head_dim
    stores = [layer.store for layer in cache.layers if isinstance(layer, RaggedLayer)]
    q = torch.randn(1, hq, 1, d)
    k_full, v_full = torch.randn(1, h, context, d), torch.randn(1, h, context, d)
    scale, one_token = d ** -0.5, np.ones(1, dtype=np.int64)
    ours, full = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for store in stores:
            segment_attention(q, store.keys, store.values, store.start, store.length, one_token, scale)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in stores:
            F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True)
        full.append(time.perf_counter() - start)
    return {"attention_ms_lukv": median_ms(ours), "attention_ms_full_sdpa": median_ms(full),
            "attention_speedup": median_ms(full) / median_ms(ours)}


def run_bench(args) -> None:
    from lukv_compile.models import load_model

    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    model, tokenizer = load_model(args.model)
    baseline, _ = load_model(args.model)
    profile = shipped_profile(model)
    model = torch.compile(model, backend="lukv", options={"profile": profile, "compression": args.compression})
    baseline = torch.compile(baseline)
    rows = []
    for context in args.contexts:
        row = bench_context(model, baseline, tokenizer, profile, context, args.compression, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "threads": args.threads, "profile": profile.calibration, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate on the real model with the LU-KV cache and show the bytes saved")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--compression", type=float, default=0.8)
    p.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"),
                   help="compiler after the lukv pass (inductor compiles for minutes on a 2-core CPU)")
    p.set_defaults(func=run_demo)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="KV bytes and decode latency: LU-KV vs the uncompressed compiled model")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 8192])
    p.add_argument("--compression", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=20, help="decode steps per context (2 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable A/B timing on shared CPUs)")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=run_bench)
