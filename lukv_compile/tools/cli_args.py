"""argparse types shared by the `lukv` subcommands: each error names the bad value and what is allowed."""

from __future__ import annotations

import argparse
from pathlib import Path

from lukv_compile.profile import check_compression


def int_at_least(minimum: int):
    """argparse type: an integer >= minimum, with an error naming the bad value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 ("1024,4096")."""
    return [positive_int(part) for part in text.split(",")]


def compression_arg(text: str) -> float:
    try:
        return check_compression(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None



def load_model_arg(model: str, dtype: str):
    """(model, tokenizer) for a registered model name or a saved transformers folder."""
    import torch

    from lukv_compile import models

    torch_dtype = getattr(torch, dtype)
    if Path(model).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa").eval()
        return loaded, AutoTokenizer.from_pretrained(model)
    if model not in models.MODELS:
        raise ValueError(f"model {model!r} is neither a known name ({', '.join(sorted(models.MODELS))}) "
                           "nor a folder holding a saved transformers model")
    return models.load_model(model, dtype=torch_dtype)
