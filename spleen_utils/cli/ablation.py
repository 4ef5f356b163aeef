"""``spleen-seg ablation``: the quick profile trained four times, one data ingredient added each time
(:mod:`spleen_utils.ablation`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_ablation(a: argparse.Namespace) -> int:
    from ..ablation import run_ablation

    run_ablation(Path(a.out), progress=not a.quiet)
    return 0


def register(subparsers) -> None:
    from .. import ablation

    p = subparsers.add_parser("ablation", help="train the quick profile four times, adding one data ingredient each time; real-CT Dice per step",
                              description=ablation.__doc__.split("\n\n")[1] if ablation.__doc__ else None)
    p.add_argument("--out", default=str(ablation.DEFAULT_RECORD), help="the JSON record (default: book/records/ablation.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablation)
