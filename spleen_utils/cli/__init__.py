"""The ``spleen-seg`` command: a thin caller of the same functions the notebooks use, one module per
stage (:mod:`.data`, :mod:`.train`, :mod:`.predict` with convert and evaluate, :mod:`.serve`,
:mod:`.reproduce`, :mod:`.deploy`, :mod:`.ablation`, :mod:`.gpu_check`), each adding its commands
with ``register(subparsers)``; the argument types they share are in :mod:`.args`.

Errors a user can fix print one sentence and exit with status 2; an interruption exits 130 and
says how to continue. Each command imports what is heavy inside itself: ``spleen-seg --help``
imports neither torch nor MONAI.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import SpleenError
from . import ablation, data, deploy, gpu_check, predict, reproduce, serve, train
from .train import config_from_args

__all__ = ["build_parser", "config_from_args", "main"]

MAIN_EXAMPLES = """examples (inside the project's environment: `source .venv/bin/activate`, or call .venv/bin/spleen-seg):
  spleen-seg train --profile quick            # generate the quick data set if needed, then train (~10 min, CPU)
  spleen-seg predict --model outputs/runs/quick/best_model.pt --input ct.nii.gz --output mask.nii.gz
  spleen-seg evaluate --pred mask.nii.gz --label spleen.nii.gz
  spleen-seg reproduce                        # every notebook, the book and a summary (what `make reproduce` runs)
  spleen-seg COMMAND --help                   # the options of one command
"""

#: the command modules, in the order ``spleen-seg --help`` lists their commands
COMMANDS = (data, train, predict, serve, reproduce, deploy, ablation, gpu_check)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="spleen-seg", description="3D spleen segmentation on CT with MONAI: data, training, inference, evaluation.",
        epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"spleen-seg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\..*")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed (train re-launches it under torchrun)
    try:
        return int(args.func(args) or 0)
    except SpleenError as e:
        print(f"spleen-seg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " Continue with `spleen-seg train --resume` (same --out)." if getattr(args, "command", "") == "train" else ""
        print(f"spleen-seg: interrupted; files already written are intact.{hint}", file=sys.stderr)
        return 130
