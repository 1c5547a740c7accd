"""Range-checked argparse types for the numeric options of every stage.

    p.add_argument("--knn-k", type=positive_int, default=20)
    p.add_argument("--val-fraction", type=fraction_open, default=0.2)

A value out of range (``--knn-k 0``, ``--threshold nan``, ``--val-fraction 1``, ``--threads
-1``) is refused by argparse with one line naming the option ("argument --knn-k: must be an
integer >= 1, got '0'") and exit status 2, before anything is read or written, instead of
silently giving wrong results.
"""
from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def int_between(low: int, high: int | None = None):
    """An argparse type: an integer in [``low``, ``high``] (no upper bound when ``high`` is None)."""
    span = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        v = _int(text)
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}")
        return v
    parse.__name__ = f"int>={low}" if high is None else f"int in {low}..{high}"
    return parse


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    return int_between(low)


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


#: a seed every consumer takes (faiss's is a C int; torch.manual_seed, numpy and random take it too)
SEED_MAX = 2 ** 31 - 1
seed_int = int_between(0, SEED_MAX)


def finite_float(text: str) -> float:
    """A finite number (no nan, inf)."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return v


def fraction_open(text: str) -> float:
    """A number strictly between 0 and 1."""
    v = _float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1, got {text!r}")
    return v


def fraction_left_open(text: str) -> float:
    """A number in (0, 1]."""
    v = _float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return v


def float_between(low: float, high: float):
    """An argparse type: a finite number in [low, high]."""
    def parse(text: str) -> float:
        v = _float(text)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be a number between {low:g} and {high:g}, got {text!r}")
        return v
    parse.__name__ = f"float in [{low:g}, {high:g}]"
    return parse
