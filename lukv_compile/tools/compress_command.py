"""`lukv compress DOC --model M --out doc.lukv`: compress a document once, before its questions are known.

The document becomes the start of a user turn (the model's chat template, when it has one; else the plain
text), is compressed into a LUKVCache and saved with its token ids. A service then loads the file for
each request (`LUKVCache.load(path, model)`), forks it per question or batches the questions
(`cache.fork(n)`, `questions_batch`), with each question framed by `question_ids`:
examples/compress_once_ask_many.py does this.

Methods: `kvzip` (default) scores every token by what repeating the document needs, as KVzip does (the attention
weight a repetition query gives it; `compress_context`, measured 6x a plain prefill's wall time at 1k, 15x at 8k
on 2 CPU cores) and keeps the top tokens under one threshold over every head (`--selection global`, the default);
`kvzip_pooled` takes that score's maximum over 7 neighbouring tokens (SnapKV's pooling; measured better on passkey
documents, worse when several questions follow, docs/results.md);
`reconstruction` scores the same repetition by our utility (attention x value-output norm, pooled). With
`--selection budgets` each head keeps its budget of the shipped LU-KV profile for the reconstruction ranking when
the model has one (else uniform budgets). `prompt` runs one compiled prefill and evicts by the profile's scorer
(the model's own profile by default, as the one line finds it). On held-out split 4 at 0.8 (SmolLM2, four
questions per document) the default kept 77% of the full cache's score, the reconstruction ranking on its budgets
27%, the one line's prompt eviction 48%; over held-out splits 4-7 the default kept 71% (docs/results.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lukv_compile.config import kv_shape
from lukv_compile.profile import Profile
from lukv_compile.profiling.reconstruction import SCORINGS, chat_parts, repeat_ids
from lukv_compile.runtime.cache import LUKVCache, full_cache_nbytes
from lukv_compile.runtime.compress_context import SELECTIONS, compress_context
from lukv_compile.tools.cli_args import compression_arg, load_model_arg

METHODS = (*SCORINGS, "prompt")
PLAIN_QUESTION = "\n\nQuestion: {question}\nAnswer:"


def uses_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def document_ids(tokenizer, text: str) -> torch.Tensor:
    """[1, T] ids of `text` as the start of a user turn (see module docstring)."""
    before = chat_parts(tokenizer, "")[0] if uses_chat(tokenizer) else ""
    return torch.tensor([tokenizer.encode(before + text, add_special_tokens=not uses_chat(tokenizer))])


def question_ids(tokenizer, question: str, answer_prefix: str = "") -> torch.Tensor:
    """[Q] ids that follow a `document_ids` document: the question, the end of the user turn, then the answer's
    first words when given (as the evaluation prompts: "The special magic number for ... is")."""
    after = chat_parts(tokenizer, question)[1] if uses_chat(tokenizer) else PLAIN_QUESTION.format(question=question)
    return torch.tensor(tokenizer.encode(after + answer_prefix, add_special_tokens=False))


def reconstruction_profile(model, selection: str) -> Profile:
    """The budgets a selection uses when none are given: per-head (`budgets`): the shipped LU-KV profile of the
    reconstruction ranking for this model, else uniform; a global selection takes only the total and the protected
    tokens from the profile, so uniform (as KVzip's rows of the evaluation)."""
    from lukv_compile.eval.methods import ProfileMissingError, shipped_profile

    if selection == "budgets":
        try:
            return shipped_profile(model, "reconstruction")
        except ProfileMissingError:
            pass
    return Profile.uniform(*kv_shape(model.config)[:2], scorer="reconstruction")


def default_selection(method: str) -> str:
    return "budgets" if method == "prompt" else "global"


def check_method(method: str, selection: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    if method == "prompt" and selection != "budgets":
        raise ValueError(f"selection {selection!r} needs a reconstruction scoring ({', '.join(METHODS[:-1])}): "
                         "'prompt' evicts layer by layer during the prefill, so it keeps each head's budget")


@torch.no_grad()
def compress_document(model, tokenizer, text: str, compression: float, method: str = "kvzip",
                      profile: Profile | None = None, selection: str | None = None) -> tuple[LUKVCache, torch.Tensor]:
    """The document compressed into a new LUKVCache, and its [1, T] ids (what `cache.save` stores with it).
    selection None: `global` for the reconstruction scorings, `budgets` for prompt."""
    selection = selection or default_selection(method)
    check_method(method, selection)
    ids = document_ids(tokenizer, text).to(model.device)
    if method != "prompt":
        profile = profile or reconstruction_profile(model, selection)
        cache = LUKVCache(model.config, profile=profile, compression=compression)
        compress_context(model, cache, ids, repeat_ids(tokenizer, text, chat=uses_chat(tokenizer)), method, selection)
    else:  # no profile: the model's own, as the one line finds it
        cache = LUKVCache(model.config, profile=profile, compression=compression)
        torch.compile(model, backend="lukv", options={"inner": "eager"})(ids, cache=cache)
    return cache, ids


def kept_by(cache: LUKVCache, selection: str) -> str:
    if selection == "global":
        return "global selection: one threshold over every head"
    if selection == "floored_global":
        return "global selection: one threshold over every head, each keeping a floor"
    if cache.profile.scope == "uniform":
        return "uniform budgets"
    return f"LU-KV budgets of the {cache.profile.scorer} profile"


def add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a document once into a saved LUKVCache file (ask it later)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("document", type=Path, help="UTF-8 text file")
    p.add_argument("--model", required=True, help="model name (smollm2, gemma3) or a saved transformers folder")
    p.add_argument("--out", type=Path, required=True, help="cache file to write (.lukv, safetensors inside)")
    p.add_argument("--compression", type=compression_arg, default=0.8,
                   help="fraction of the document's KV removed, in [0, 1) (default 0.8)")
    p.add_argument("--method", choices=METHODS, default="kvzip",
                   help="kvzip: KVzip's score of what repeating the document needs (default); kvzip_pooled: that "
                        "score pooled over 7 tokens; reconstruction: our "
                        "utility of that repetition; prompt: one prefill evicted by the profile's scorer")
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="global: KVzip's one threshold over every head (the default but for prompt); "
                        "budgets: each head keeps its profile's budget (the only one for prompt)")
    p.add_argument("--profile", type=Path, default=None,
                   help="LU-KV profile file (default: reconstruction: the shipped one for that ranking, else "
                        "uniform; prompt: the model's own, found as the one line finds it)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    p.set_defaults(func=run_compress)


def run_compress(args) -> None:
    if not args.document.is_file():
        raise ValueError(f"document {args.document}: no such file")
    if not args.out.parent.is_dir():
        raise ValueError(f"--out: folder {args.out.parent} does not exist")
    text = args.document.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"document {args.document} is empty")
    args.selection = args.selection or default_selection(args.method)
    check_method(args.method, args.selection)
    profile = Profile.load(args.profile) if args.profile is not None else None
    model, tokenizer = load_model_arg(args.model, args.dtype)
    started = time.perf_counter()
    cache, ids = compress_document(model, tokenizer, text, args.compression, args.method, profile, args.selection)
    seconds = time.perf_counter() - started
    cache.save(args.out, token_ids=ids)
    full = full_cache_nbytes(model.config, 1, ids.shape[1], model.dtype)
    print(f"{args.document}: {ids.shape[1]} tokens compressed by {args.method} ({kept_by(cache, args.selection)}) "
          f"at {args.compression:g} in {seconds:.1f} s; KV {cache.nbytes() / 2**20:.2f} MiB vs "
          f"{full / 2**20:.2f} MiB full ({cache.nbytes() / full:.3f}x)")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")
