"""`lukv demo` and `lukv bench`: the real model, compressed, against what a user runs without LU-KV.

bench runs three instances of the model (loaded separately, so no compiled state is shared) in one process:
  plain    transformers eager with its default DynamicCache, no compile: the main baseline;
  static   transformers' StaticCache + torch.compile(model) with the same compiler and mode as lukv
           (--inner, default inductor; --mode): what a user compiles today;
  lukv     torch.compile(model, backend="lukv", options={"inner": ...}) with a LUKVCache holding the
           shipped LU-KV SnapKV profile at --compression (the profile the published bench rows used; `lukv demo`
           runs the one line as users do: no profile, so the model's own is found).
Per thread setting (Dynamo is reset and everything recompiles: inductor's CPU kernels are built for the
thread count at compile time) and per context, on the same prompt:
  prefill    one warm-up prefill each (the compiled ones compile), then the median of --prefill-repeats,
             interleaved.
  eviction   the scoring + selection + compaction inside one more lukv prefill, timed directly: the sum of
             the `lukv::evict` ranges (eviction.EVICT_RANGE, one per layer) in a torch.profiler trace of
             it (host time: on a GPU the ranges end at their last host synchronisation).
  decode     --steps steps with the argmax token fed back, interleaved lukv / plain / static step by step;
             medians over the steps after the first WARMUP_STEPS (those compile).
  generate   prefill + --e2e-tokens new tokens (greedy, min = max new tokens), each after a short warm-up
             generate: lukv, plain, and static through transformers' own compiled generate (a StaticCache
             with a `compile_config` of the same compiler and mode, on every device).
  attention  the decode attention op alone over the lukv cache's real storage vs full-cache SDPA.
  compile_s  per contender, the first prefill and the WARMUP_STEPS first decode steps minus the warm
             medians: compilation plus other first-call costs (about 0 for plain; noise can make it < 0).
--device cuda --dtype bfloat16 --mode reduce-overhead runs the same on a GPU (CUDA graphs between lukv's
attention calls); --weights random uses the model's architecture with random weights and random prompt
tokens, for machines where the model package cannot be installed (timing only: the answers mean nothing).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lukv_compile import compat
from lukv_compile.compiler.warm_start import caching_disabled, save_warm_start, warm_start
from lukv_compile.models import MODELS
from lukv_compile.policy.eviction import EVICT_RANGE
from lukv_compile.profile import Profile
from lukv_compile.runtime.cache import LUKVCache, full_cache_nbytes
from lukv_compile.runtime.layer import RaggedLayer
from lukv_compile.settings import INDUCTOR_MODES, LUKVSettings
from lukv_compile.tools.cli_args import compression_arg, positive_int, positive_ints

WARMUP_STEPS = 2  # decode steps left out of the medians: the first compiles, the second may recompile
# (the sequence length becomes a dynamic size)
DECODERS = ("lukv", "plain", "static")  # the three ways to run the model
GENERATE_WARMUP_TOKENS = 3
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS = ("real", "random")
RECOMPILE_LIMIT = 64


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

    start = time.perf_counter()
    say(f"loading {args.model} ...")
    model, tokenizer = load_model(args.model)
    prompt, answers = passkey_prompt(tokenizer, args.context)
    inputs = tokenizer(prompt, return_tensors="pt")
    say(start_warm(model, args.inner))
    regional = not args.whole_model
    compiled = torch.compile(model, backend="lukv", options={  # no profile: the model's own, as the one line
        "compression": args.compression, "inner": args.inner, "regional": regional})
    scope = "one decoder layer, shared by all" if regional else "the whole model"
    say(f"generating from a {inputs.input_ids.shape[1]}-token prompt (the first call compiles {scope}; "
        f"inner compiler {args.inner}) ...")
    loaded = time.perf_counter()
    out = compiled.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    generated = time.perf_counter()
    saved = save_warm_start(model)
    answer = tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    tokens = out.sequences.shape[1] - 1
    full = full_cache_nbytes(model.config, 1, tokens, model.dtype)
    found = all(a in answer for a in answers)
    say(f"prompt: {inputs.input_ids.shape[1]} tokens with a passkey inside; compression {args.compression}, "
        f"{out.cache.profile.scorer} ranking on {out.cache.profile.scope} budgets")
    say(f"answer: {answer.strip()!r}  ({'found' if found else 'missed'} the passkey {', '.join(answers)})")
    say(f"KV cache: {out.cache.nbytes() / 2**20:.2f} MiB vs {full / 2**20:.2f} MiB uncompressed "
        f"({out.cache.nbytes() / full:.3f}x)")
    say(f"time: load {loaded - start:.1f} s, generate {generated - loaded:.1f} s including compilation, "
        f"total {time.perf_counter() - start:.1f} s" + (f"; compile artifacts saved to {saved}" if saved else ""))


def start_warm(model, inner: str) -> str:
    """Load the compile artifacts an earlier run saved (compiler/warm_start.py); one line saying what happened."""
    if caching_disabled():
        return "warm start skipped: PyTorch's compile caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES)"
    if inner != "inductor":
        return f"no warm start with inner {inner}: only inductor's compiled code is cached"
    path = warm_start(model)
    if path is None:
        return "no compile artifacts saved yet: this run compiles cold (inductor saves them for the next run)"
    return f"warm start: compile artifacts loaded from {path}"


def say(message: str) -> None:
    print(message, flush=True)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


@dataclass(frozen=True)
class BenchOptions:
    compression: float = 0.8
    inner: str = "inductor"
    steps: int = 20
    prefill_repeats: int = 1
    e2e_tokens: int = 64
    regional: bool = False  # lukv compiles one decoder layer (options regional=True)
    device: str = "cpu"
    dtype: str = "float32"
    mode: str | None = None  # inductor's mode for lukv and static
    weights: str = "real"

    def __post_init__(self) -> None:
        if self.steps <= WARMUP_STEPS:
            raise ValueError(f"--steps must be more than the {WARMUP_STEPS} warm-up steps, got {self.steps}")
        if self.prefill_repeats < 1 or self.e2e_tokens < 1:
            raise ValueError("--prefill-repeats and --e2e-tokens must be at least 1")
        LUKVSettings(inner=self.inner, mode=self.mode)  # the mode's own checks (inductor's modes, inner inductor)
        for name, value, allowed in (("device", self.device, DEVICES), ("dtype", self.dtype, tuple(DTYPES)),
                                     ("weights", self.weights, WEIGHTS)):
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here")

    @classmethod
    def from_args(cls, args) -> BenchOptions:
        return cls(args.compression, args.inner, args.steps, args.prefill_repeats, args.e2e_tokens, args.regional,
                   args.device, args.dtype, args.mode, args.weights)


@dataclass
class Contender:
    """One way to run the model: what to call (compiled or not) and how to make its empty cache."""

    model: Any
    new_cache: Callable[[int], Any]  # tokens the cache must hold -> an empty cache


def contenders(models: dict[str, Any], profile: Profile, opts: BenchOptions) -> dict[str, Contender]:
    """lukv, plain and static, from three model instances."""
    from transformers import DynamicCache, StaticCache

    lukv = torch.compile(models["lukv"], backend="lukv",
                         options={"inner": opts.inner, "regional": opts.regional, "mode": opts.mode})
    config = models["lukv"].config

    return {
        "lukv": Contender(lukv, lambda tokens: LUKVCache(config, profile=profile, compression=opts.compression)),
        "plain": Contender(models["plain"], lambda tokens: DynamicCache(config=models["plain"].config)),
        "static": Contender(torch.compile(models["static"], backend=opts.inner, mode=opts.mode),
                            lambda tokens: StaticCache(config=models["static"].config, max_cache_len=tokens)),
    }


def static_generate_config(opts: BenchOptions):
    """transformers' own compiled generate for the static contender: `compile_config` with lukv's compiler
    and mode, on every device (transformers compiles on its own only on accelerators)."""
    from transformers import CompileConfig

    config = CompileConfig(backend=opts.inner, mode=opts.mode or "default")
    config._compile_all_devices = True
    return config


def timed_step(contender: Contender, cache, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One forward of `ids` on `cache` (a prefill or a decode step): the argmax next token and its seconds."""
    start = time.perf_counter()
    token = contender.model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    if token.is_cuda:
        torch.cuda.synchronize()
    return token, time.perf_counter() - start


def measure_prefill(runs: dict[str, Contender], ids: torch.Tensor, tokens: int, repeats: int):
    """1 + `repeats` interleaved prefills on fresh caches: seconds of each (the warm-up first), and
    (cache, next token) of each contender's last prefill."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    state = {}
    for _ in range(1 + repeats):
        for name, run in runs.items():
            cache = run.new_cache(tokens)
            token, seconds = timed_step(run, cache, ids)
            times[name].append(seconds)
            state[name] = (cache, token)
    return times, state


def measure_decode(runs: dict[str, Contender], state: dict, steps: int) -> dict[str, list[float]]:
    """`steps` decode steps, the argmax fed back, interleaved over `runs` step by step (advances `state`)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            cache, token = state[name]
            token, seconds = timed_step(run, cache, token)
            state[name] = (cache, token)
            times[name].append(seconds)
    return times


def generate_seconds(run: Contender, ids: torch.Tensor, new_tokens: int, room: int, **kwargs) -> float:
    """Wall seconds of generate(): prefill + exactly `new_tokens` greedy tokens, on the contender's cache
    made for `room` new tokens (the same size in the warm-up: a StaticCache's size is compiled in)."""
    start = time.perf_counter()
    run.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       cache=run.new_cache(ids.shape[1] + room), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, **kwargs)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_generate(runs: dict[str, Contender], ids: torch.Tensor, new_tokens: int,
                     kwargs: dict[str, dict]) -> dict[str, float]:
    """End-to-end generate seconds of each contender (generate keywords `kwargs[name]`), after a short
    warm-up generate of each."""
    for name, run in runs.items():
        generate_seconds(run, ids, min(GENERATE_WARMUP_TOKENS, new_tokens), new_tokens, **kwargs.get(name, {}))
    return {name: generate_seconds(run, ids, new_tokens, new_tokens, **kwargs.get(name, {}))
            for name, run in runs.items()}


def decode_fields(decode: dict[str, list[float]]) -> dict:
    ms = {name: median_ms(times[WARMUP_STEPS:]) for name, times in decode.items()}
    per_s = {name: 1000 / ms[name] for name in ms}
    return {**{f"decode_ms_{n}": ms[n] for n in ms}, **{f"tokens_per_s_{n}": per_s[n] for n in per_s},
            "tokens_per_s_ratio_lukv_plain": per_s["lukv"] / per_s["plain"],
            "tokens_per_s_ratio_lukv_static": per_s["lukv"] / per_s["static"]}


def eviction_seconds(run: Contender, ids: torch.Tensor, tokens: int) -> float:
    """Seconds of eviction work (every layer's `lukv::evict` range) in one profiled prefill on a fresh cache."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        timed_step(run, run.new_cache(tokens), ids)
    ranges = [event for event in trace.events() if event.name == EVICT_RANGE]
    if not ranges:
        raise RuntimeError(f"the lukv prefill ran no {EVICT_RANGE!r} range: nothing was evicted")
    return sum(event.cpu_time_total for event in ranges) / 1e6


def prefill_fields(prefill: dict[str, list[float]], eviction: float) -> dict:
    s = {name: statistics.median(times[1:]) for name, times in prefill.items()}
    return {**{f"prefill_s_{n}": s[n] for n in s}, "prefill_eviction_s": eviction,
            "prefill_eviction_share_of_plain": eviction / s["plain"]}


def generate_fields(e2e: dict[str, float]) -> dict:
    return {**{f"e2e_s_{name}": seconds for name, seconds in e2e.items()},
            **{f"e2e_speedup_lukv_{base}": e2e[base] / e2e["lukv"] for base in ("plain", "static")}}


def compile_fields(prefill: dict[str, list[float]], decode: dict[str, list[float]]) -> dict:
    """Per compiled contender: first prefill minus the warm median, and the warm-up decode steps' excess
    over the warm median (both steps: the second may recompile for a dynamic sequence length)."""
    def excess(times: list[float], warm_up: int) -> float:
        warm = statistics.median(times[warm_up:])
        return sum(t - warm for t in times[:warm_up])

    return {name: {"prefill": excess(prefill[name], 1), "decode": excess(decode[name], WARMUP_STEPS)}
            for name in DECODERS}


def kv_fields(cache: LUKVCache, config, tokens: int, dtype: torch.dtype) -> dict:
    full = full_cache_nbytes(config, 1, tokens, dtype)
    return {"kv_bytes_lukv": cache.nbytes(), "kv_bytes_full": full, "kv_bytes_ratio": cache.nbytes() / full}


def bench_context(runs: dict[str, Contender], ids: torch.Tensor, opts: BenchOptions) -> dict:
    """Every measurement of one prompt `ids` [1, T] (see the module docstring); one flat row."""
    tokens, ids = ids.shape[1] + opts.steps, ids.to(opts.device)
    with torch.no_grad():
        say(f"  prefill x{1 + opts.prefill_repeats} each (the first compiles): {', '.join(runs)} ...")
        prefill, state = measure_prefill(runs, ids, tokens, opts.prefill_repeats)
        say("  one more lukv prefill, profiled: its eviction ranges ...")
        eviction = eviction_seconds(runs["lukv"], ids, tokens)
        say(f"  decode {opts.steps} steps interleaved ({WARMUP_STEPS} warm-up): {', '.join(DECODERS)} ...")
        decode = measure_decode(runs, state, opts.steps)
        say(f"  generate prefill + {opts.e2e_tokens} tokens: {', '.join(DECODERS)} ...")
        static = Contender(runs["static"].model._orig_mod, runs["static"].new_cache)  # transformers compiles it
        e2e = measure_generate(runs | {"static": static}, ids, opts.e2e_tokens,
                               {"static": {"compile_config": static_generate_config(opts)}})
    say("  decode attention op alone: lukv storage vs full-cache SDPA ...")
    cache, model = state["lukv"][0], runs["plain"].model
    return {"prompt_tokens": ids.shape[1], **asdict(opts), "decode_steps_timed": opts.steps - WARMUP_STEPS,
            **kv_fields(cache, model.config, tokens, model.dtype), **decode_fields(decode),
            **prefill_fields(prefill, eviction), **generate_fields(e2e), **bench_attention(cache, model.config, tokens),
            "compile_s": compile_fields(prefill, decode)}


def bench_attention(cache: LUKVCache, config, context: int, repeats: int = 15) -> dict:
    """The decode attention op alone over every layer's real ragged storage vs full-cache SDPA, interleaved."""
    hq, h, d = config.num_attention_heads, config.num_key_value_heads, cache.head_dim
    layers = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    like = {"device": layers[0].store.device, "dtype": layers[0].store.keys.dtype}
    q = torch.randn(1, hq, 1, d, **like)
    k_full, v_full = torch.randn(1, h, context, d, **like), torch.randn(1, h, context, d, **like)
    scale, one_token = d ** -0.5, np.ones(1, dtype=np.int64)
    ours, full = [], []
    for _ in range(repeats):
        ours.append(seconds_of(lambda: [layer.attend_stored(q, one_token, scale) for layer in layers]))
        full.append(seconds_of(lambda: [F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True)
                                        for _ in layers]))
    return {"attention_ms_lukv": median_ms(ours), "attention_ms_full_sdpa": median_ms(full),
            "attention_speedup": median_ms(full) / median_ms(ours)}


def seconds_of(work: Callable[[], Any]) -> float:
    """Wall seconds of `work()`, waiting for the GPU when there is one."""
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def thread_settings(spec: str) -> list[tuple[str, int]]:
    """"1,default" -> [("1", 1), ("default", torch's default count)], dropping repeats of a count.

    Call before anything sets the thread count: "default" is torch's count at that moment.
    """
    default, settings = torch.get_num_threads(), {}
    for label in (part.strip() for part in spec.split(",")):
        if label != "default" and not (label.isdigit() and int(label) > 0):
            raise ValueError(f"--threads takes positive counts and 'default', got {label!r}")
        settings.setdefault(default if label == "default" else int(label), label)
    return [(label, count) for count, label in settings.items()]


def bench_threads(models: dict[str, Any], profile: Profile, prompt_ids: Callable[[int], torch.Tensor],
                  contexts: list[int], opts: BenchOptions, label: str, threads: int) -> Iterator[dict]:
    """One row per context at `threads` torch threads, compiling afresh for that count."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # inductor's CPU kernels are specialised to the thread count they were compiled at
    # The three instances share their forwards' code objects, so their variants count against one limit.
    compat.raise_recompile_limit(RECOMPILE_LIMIT)
    runs = contenders(models, profile, opts)
    say(f"threads {label} ({threads}): lukv and static compile ({opts.inner}) at their first prefill and decode steps")
    for context in contexts:
        say(f"context {context}, threads {label} ({threads}):")
        yield {"context": context, "threads": label, "num_threads": threads,
               **bench_context(runs, prompt_ids(context), opts)}


def random_ids(vocab_size: int) -> Callable[[int], torch.Tensor]:
    """context -> random token ids [1, context] (seeded by the length), for random weights."""
    def ids(context: int) -> torch.Tensor:
        return torch.randint(3, vocab_size, (1, context), generator=torch.Generator().manual_seed(context))

    return ids


def passkey_ids(tokenizer) -> Callable[[int], torch.Tensor]:
    """context -> the input ids [1, <= context] of a passkey prompt of that length."""
    def ids(context: int) -> torch.Tensor:
        return tokenizer(passkey_prompt(tokenizer, context)[0], return_tensors="pt").input_ids[:, -context:]

    return ids


def report(rows: Iterator[dict], result: dict, path: str | None) -> dict:
    """Print each row as one JSON line as it comes; rewrite `path` (when given) with all rows so far."""
    result = {**result, "rows": []}
    for row in rows:
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        if path:
            Path(path).write_text(json.dumps(result, indent=2))
    return result


def run_bench(args) -> None:
    import transformers

    from lukv_compile.models import load_model, random_model

    opts, settings = BenchOptions.from_args(args), thread_settings(args.threads)
    dtype, models = DTYPES[opts.dtype], {}
    for name in DECODERS:  # one instance each: no compiled state shared
        say(f"loading {args.model} ({opts.weights} weights, {opts.dtype}) for {name} on {opts.device} ...")
        if opts.weights == "random":
            models[name] = random_model(args.model, dtype).to(opts.device)
        else:
            models[name], tokenizer = load_model(args.model, dtype)
            models[name].to(opts.device)
    profile = shipped_profile(models["lukv"])
    prompt_ids = random_ids(models["lukv"].config.vocab_size) if opts.weights == "random" else passkey_ids(tokenizer)
    rows = (row for label, threads in settings
            for row in bench_threads(models, profile, prompt_ids, args.contexts, opts, label, threads))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    report(rows, {"model": args.model, "profile": profile.calibration, **versions}, args.json)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate on the real model with the LU-KV cache and show the bytes saved")
    p.add_argument("--model", default="smollm2", help=f"registered model name ({', '.join(MODELS)}; default smollm2)")
    p.add_argument("--context", type=positive_int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--compression", type=compression_arg, default=0.8,
                   help="fraction of the prompt's KV removed, in [0, 1) (default 0.8)")
    p.add_argument("--inner", default="eager", choices=("inductor", "aot_eager", "eager"),
                   help="compiler after the lukv pass (default eager: the rewritten graph runs as traced, no "
                        "AOT tracing, the quickest first call; inductor compiles for minutes on a 2-core CPU)")
    p.add_argument("--whole-model", action="store_true",
                   help="trace the whole model (Dynamo, ~14 s on SmolLM2) instead of one decoder layer shared by "
                        "all (options regional=True, ~1 s; the glue around the layers runs eagerly)")
    p.set_defaults(func=run_demo)



def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="KV bytes, prefill, decode and generate time: LU-KV vs plain and static")
    p.add_argument("--model", default="smollm2", help=f"registered model name ({', '.join(MODELS)}; default smollm2)")
    p.add_argument("--contexts", type=positive_ints, default=[1024, 4096, 8192],
                   help="comma-separated prompt lengths in tokens (default 1024,4096,8192)")
    p.add_argument("--compression", type=compression_arg, default=0.8,
                   help="fraction of the prompt's KV removed, in [0, 1) (default 0.8)")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="compiler after the lukv pass, also the static baseline's compiler")
    p.add_argument("--steps", type=int, default=20, help=f"decode steps per context ({WARMUP_STEPS} warm-up)")
    p.add_argument("--prefill-repeats", type=int, default=1, help="timed prefills each, after a warm-up one")
    p.add_argument("--e2e-tokens", type=int, default=64, help="new tokens of the end-to-end generate")
    p.add_argument("--threads", default="1,default",
                   help="torch thread counts to run, comma-separated; 'default' is torch's own count")
    p.add_argument("--regional", action="store_true",
                   help="compile lukv one decoder layer at a time (options regional=True); static stays whole-model")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the three models run (default cpu)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model dtype (default float32)")
    p.add_argument("--mode", default=None, choices=INDUCTOR_MODES,
                   help="inductor's mode for lukv and static (reduce-overhead: CUDA graphs; needs --inner inductor)")
    p.add_argument("--weights", default="real", choices=WEIGHTS,
                   help="real: the installed model and a passkey prompt; random: its architecture with random "
                        "weights and random tokens (timing only, where the model package is not installed)")
    p.add_argument("--json", help="also write the results to this file (rewritten after every row)")
    p.set_defaults(func=run_bench)
