"""argparse types shared by the `lukv` subcommands: each error names the bad value and what is allowed."""

from __future__ import annotations

import argparse

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

