"""argparse `type=` validators shared by the subcommands (a bad value is one line from argparse, exit 2)."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line, "PROG: MESSAGE (see --help)", exit 2 (not usage + message);
    its subcommands' parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def as_int(text: str) -> int:
    """`text` as an int, or argparse's one-line error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def as_number(text: str) -> float:
    """`text` as a float, or argparse's one-line error."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    value = as_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative(text: str) -> float:
    value = as_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def finite_non_negative(text: str) -> float:
    """A finite number >= 0 (guidance scales, weights): 'nan' and 'inf' are refused."""
    value = non_negative(text)
    if value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_gib(text: str) -> float:
    """A finite number of GiB > 0 (memory budgets)."""
    value = as_number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be > 0 (GiB)")
    return value


SEED_MAX = 2**32 - 1  # numpy's and NVIDIA's scripts' seed range; torch takes more, but a seed must be portable


def seed(text: str) -> int:
    value = as_int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} must be in 0..{SEED_MAX}")
    return value


def non_negative_int(text: str) -> int:
    value = as_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether CUDA is there is checked later, with torch imported)."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda or cuda:N")
    return text
