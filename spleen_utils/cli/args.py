"""Argument types and small helpers shared by the ``spleen-seg`` commands (one copy of each)."""

from __future__ import annotations

import argparse
import sys


def _csv(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def csv_ints(text: str) -> tuple[int, ...]:
    """``96,96,96`` -> (96, 96, 96)."""
    return _csv(text, int, "integers")


def positive_csv_ints(text: str) -> tuple[int, ...]:
    """:func:`csv_ints`, each at least 1."""
    values = csv_ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def csv_floats(text: str) -> tuple[float, ...]:
    """``1.5,1.5,2`` -> (1.5, 1.5, 2.0)."""
    return _csv(text, float, "numbers")


def csv_names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"); ``none`` (or an empty string) -> ()."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names in ((), ("none",)) else names


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def progress_printer(quiet: bool):
    """``None`` when ``quiet``, else a callback that prints ``... step`` lines to stderr."""
    return None if quiet else (lambda s: print(f"... {s}", file=sys.stderr, flush=True))


def add_command(sub, name: str, func, help: str, epilog: str | None = None):
    """``spleen-seg NAME``: a sub-parser that runs ``func(args)``; ``epilog`` (examples) is printed as written."""
    p = sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p
