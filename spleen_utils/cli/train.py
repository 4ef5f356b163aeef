"""``spleen-seg train``: the recipe, on one process or several (DDP through torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SpleenError
from .args import add_command, csv_floats, csv_ints, csv_names

TRAIN_EXAMPLES = """examples:
  spleen-seg train                                   # the quick profile, as the tutorial runs it
  spleen-seg train --epochs 5 --out outputs/runs/try # a short run in its own folder
  spleen-seg train --resume --out outputs/runs/try   # continue an interrupted run
  spleen-seg train --profile full                    # MSD Task09 on a GPU (spleen-seg data download first)
  spleen-seg train --profile full --nproc-per-node 4 # 4 GPUs of one machine (DDP through torchrun)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job1 \\
      -m spleen_utils.cli train --profile full       # several machines: the same command on each node
"""

#: ``spleen-seg train`` options that set the configuration field of the same name
CONFIG_OPTIONS = (
    "epochs", "device", "val_interval", "val_cases", "max_cases", "batch_size", "seed", "num_workers",
    "cache_rate", "patch_size", "num_samples", "sw_roi", "pixdim", "appearance_prob", "select_on",
    "train_sources", "real_train", "real_val", "real_repeats", "wild", "loss"
)


def config_from_args(a: argparse.Namespace):
    from ..config import get_config

    over = {name: getattr(a, name) for name in CONFIG_OPTIONS}
    over["learning_rate"] = a.lr
    if a.no_amp:
        over["amp"] = False
    if a.data:
        data = Path(a.data)
        over["data_root"], over["dataset"] = data.parent, data.name
    if a.out:
        over["out_dir"] = Path(a.out)
    return get_config(a.profile, **over)


def ensure_dataset(cfg, progress: bool = True) -> None:
    """The quick profile makes its synthetic set on first use; MSD must be downloaded."""
    if cfg.dataset.startswith("Synthetic"):
        from ..synthetic import write_profile_dataset

        if not (cfg.dataset_dir / "dataset.json").exists():
            print(f"{cfg.dataset_dir} does not exist yet: generating the synthetic dataset first.", file=sys.stderr)
        write_profile_dataset(cfg, progress=progress)  # nothing to do when the same set is there
    elif not (cfg.dataset_dir / "dataset.json").exists():
        raise SpleenError(f"{cfg.dataset_dir}: no dataset here; run `spleen-seg data download --root {cfg.data_root}` first.")


def cmd_train(a: argparse.Namespace) -> int:
    from .. import distributed
    from ..runs import RunDir
    from ..train import train

    cfg = config_from_args(a)
    if a.nproc_per_node is not None and a.nproc_per_node < 1:
        raise SpleenError(f"--nproc-per-node must be at least 1, not {a.nproc_per_node}.")
    if (a.nproc_per_node or 1) > 1 and not distributed.launched_by_torchrun():
        # one machine, N processes: torchrun starts them, each runs this command without the option
        ensure_dataset(cfg, progress=not a.quiet)
        argv = getattr(a, "argv", None) or sys.argv[1:]
        argv = argv[argv.index("train") + 1:] if "train" in argv else argv
        return distributed.launch(distributed.strip_option(argv, "--nproc-per-node"), a.nproc_per_node)
    if distributed.launched_by_torchrun():  # under torchrun: join the job, write the data once per node
        from ..model import resolve_device

        distributed.setup(resolve_device(cfg.device))
    with distributed.local_main_first():
        ensure_dataset(cfg, progress=not a.quiet and distributed.current().local_rank == 0)
    max_seconds = a.max_minutes * 60 if a.max_minutes else None
    try:
        summary = train(cfg, resume=a.resume, progress=not a.quiet, max_seconds=max_seconds, sync_bn=a.sync_bn)
        rank = distributed.current().rank
    finally:
        distributed.cleanup()
    if rank != 0:
        return 0  # rank 0 reports
    print(json.dumps(summary, indent=2))
    print(f"best model: {RunDir(cfg.out_dir).best_model}")
    return 0


def register(sub) -> None:
    t = add_command(sub, "train", cmd_train, help="train the recipe (quick: CPU minutes on synthetic data; full: MSD on a GPU)", epilog=TRAIN_EXAMPLES)
    t.add_argument("--profile", choices=["quick", "full"], default="quick",
                   help="quick (default): CPU minutes on generated CT + shipped real scans; full: MSD Task09 on a GPU")
    t.add_argument("--data", help="dataset folder in MSD layout (default: the profile's under data/)")
    t.add_argument("--out", help="run folder (default: outputs/runs/<profile>)")
    t.add_argument("--epochs", type=int, help="epochs to train (default: the profile's, 28 quick / 600 full)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last.pt")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--val-interval", type=int, help="validate every N epochs")
    t.add_argument("--val-cases", type=int, help="validate on the last N of the sorted cases")
    t.add_argument("--max-cases", type=int, help="use only the first N training cases")
    t.add_argument("--batch-size", type=int, help="volumes per step (each gives --num-samples crops)")
    t.add_argument("--num-samples", type=int, help="random crops per volume")
    t.add_argument("--patch-size", type=csv_ints, help="crop size, e.g. 96,96,96")
    t.add_argument("--sw-roi", type=csv_ints, help="sliding-window size for validation, e.g. 160,160,160")
    t.add_argument("--pixdim", type=csv_floats, help="target spacing in mm, e.g. 1.5,1.5,2.0")
    t.add_argument("--lr", type=float, help="Adam learning rate")
    t.add_argument("--cache-rate", type=float, help="share of the cases MONAI's CacheDataset keeps in memory (0-1)")
    t.add_argument("--num-workers", type=int, help="data-loading processes (default: the profile's)")
    t.add_argument("--seed", type=int, help="random seed of weights, crops and augmentation (default 0)")
    t.add_argument("--no-amp", action="store_true", help="train in fp32")
    t.add_argument("--train-sources", type=csv_names, help="sources of the generated set that train: phantom,labelmap (default: both)")
    t.add_argument("--real-train", type=csv_names, help="shipped real scans that train, e.g. totalseg_ct_3mm ('none': no real scan)")
    t.add_argument("--real-val", type=csv_names, help="shipped real scans validated at every validation ('none': none)")
    t.add_argument("--real-repeats", type=int, help="how often each --real-train scan appears per epoch")
    t.add_argument("--wild", type=float, help="share of repainted crops whose soft tissues get arbitrary HU (default: 0.25)")
    t.add_argument("--appearance-prob", type=float, help="share of training crops repainted with a random CT appearance (0: no augmentation)")
    t.add_argument("--loss", choices=["dice", "dicece"], help="training loss: dice (the recipe's) or dicece (Dice + cross-entropy)")
    t.add_argument("--select-on", choices=["generated", "all"], help="validation cases that choose the best checkpoint (default: generated)")
    t.add_argument("--max-minutes", type=float, help="stop (after validating) once this much training time has passed")
    t.add_argument("--nproc-per-node", type=int, help="data-parallel processes on this machine (DDP through torchrun; one per GPU, gloo on CPU)")
    t.add_argument("--sync-bn", action="store_true", help="with several GPUs: batch-norm statistics over all processes (SyncBatchNorm)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
