"""``spleen-seg gpu-check``: full-profile training, per-patch latency and end-to-end inference measured
on a GPU (:mod:`spleen_utils.gpu_check`)."""

from __future__ import annotations

import argparse
import sys


def cmd_gpu_check(a: argparse.Namespace) -> int:
    from ..gpu_check import PARTS, run_gpu_check

    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip()) if a.parts else PARTS
    res = run_gpu_check(device=a.device, smoke=a.smoke, records=a.records, work=a.work, model=a.model, parts=parts)
    for p in res["records"]:
        print(f"record: {p}")
    if res["failed"]:
        print(f"spleen-seg: gpu-check: these parts failed (see their records): {', '.join(res['failed'])}", file=sys.stderr)
        return 1
    return 0


EXAMPLES = """examples:
  make gpu-wheels                  # once, with network: gpu_wheels/ (monai, nibabel, spleen-utils wheels)
  make gpu-check                   # on the GPU machine: install from gpu_wheels/ offline, then this command
  spleen-seg gpu-check --device cuda --model outputs/runs/quick/best_model.pt
  spleen-seg gpu-check --device cpu --smoke     # every step at toy sizes (what make test runs)
"""


def register(sub) -> None:
    from ..gpu_check import PARTS

    g = sub.add_parser("gpu-check", help="measure full-profile training, per-patch latency and end-to-end inference on a GPU",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--device", choices=["cuda", "cpu", "auto"], default="cuda")
    g.add_argument("--smoke", action="store_true", help="toy sizes, seconds: checks that every step runs (numbers mean nothing)")
    g.add_argument("--records", help="folder for the JSON records (default: book/records on a GPU, a temporary folder otherwise)")
    g.add_argument("--work", help="scratch folder for the generated volumes and runs (default: a temporary folder)")
    g.add_argument("--model", help="checkpoint for the end-to-end part (default: the one the train part just made)")
    g.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    g.set_defaults(func=cmd_gpu_check)
