"""The ``spleen-seg`` command: a thin caller of the same functions the notebooks use.

Errors a user can fix print one sentence and exit with status 2; an interruption exits 130 and
says how to continue.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import SpleenError


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ---------------------------------------------------------------- data
def cmd_data_download(a: argparse.Namespace) -> int:
    from .data import MSD_MD5, MSD_URL, download_msd

    # a mirror serves the same archive: MONAI's MD5 still applies unless --md5 says otherwise
    md5 = MSD_MD5 if a.md5 is None else (None if a.md5.strip().lower() == "none" else a.md5)
    path = download_msd(a.root, url=a.url or MSD_URL, md5=md5)
    print(f"MSD Task09 Spleen is ready in {path}")
    return 0


def cmd_data_synthetic(a: argparse.Namespace) -> int:
    from .config import get_config
    from .synthetic import write_profile_dataset

    cfg = get_config("quick", data_root=Path(a.root), synthetic_cases=a.cases, synthetic_test_cases=a.test_cases,
                     labelmap_cases=a.labelmap_cases, seed=a.seed)
    path = write_profile_dataset(cfg, progress=not a.quiet)
    print(f"synthetic dataset ({cfg.synthetic_cases} phantoms + {cfg.labelmap_cases} cases per real label map, "
          f"{cfg.synthetic_test_cases} test cases, seed {cfg.seed}) is ready in {path}")
    return 0


# ---------------------------------------------------------------- train
def _csv_names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"); ``none`` (or an empty string) -> ()."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names in ((), ("none",)) else names


def config_from_args(a: argparse.Namespace):
    from .config import get_config

    over = dict(
        epochs=a.epochs,
        device=a.device,
        val_interval=a.val_interval,
        val_cases=a.val_cases,
        max_cases=a.max_cases,
        batch_size=a.batch_size,
        seed=a.seed,
        num_workers=a.num_workers,
        cache_rate=a.cache_rate,
        learning_rate=a.lr,
        patch_size=a.patch_size,
        num_samples=a.num_samples,
        sw_roi=a.sw_roi,
        pixdim=a.pixdim,
        appearance_prob=a.appearance_prob,
        select_on=a.select_on,
        train_sources=a.train_sources,
        real_train=a.real_train,
        real_val=a.real_val,
        real_repeats=a.real_repeats,
        wild=a.wild,
        loss=a.loss,
    )
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
        from .synthetic import write_profile_dataset

        if not (cfg.dataset_dir / "dataset.json").exists():
            print(f"{cfg.dataset_dir} does not exist yet: generating the synthetic dataset first.", file=sys.stderr)
        write_profile_dataset(cfg, progress=progress)  # nothing to do when the same set is there
    elif not (cfg.dataset_dir / "dataset.json").exists():
        raise SpleenError(f"{cfg.dataset_dir}: no dataset here; run `spleen-seg data download --root {cfg.data_root}` first.")


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .train import train

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
        from .model import resolve_device

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
    print(f"best model: {Path(cfg.out_dir) / 'best_model.pt'}")
    return 0


# ---------------------------------------------------------------- predict / evaluate
def cmd_predict(a: argparse.Namespace) -> int:
    # with an ONNX model nothing below imports torch or MONAI (tests/test_startup.py checks it)
    import time

    from .infer import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.from_path(a.model, backend=a.backend, device=a.device, precision=a.precision, lcc=not a.no_lcc, progress=False)
    t_open = time.perf_counter() - t0

    if predictor.training_note:
        print(f"note: {predictor.training_note}", file=sys.stderr)

    def report(rec):
        t = rec["timings"]
        print(f"{Path(rec['input']).name}: {rec['spleen_ml']:.1f} mL spleen -> {rec['output']} ({t['total_s']:.1f} s: read "
              f"{t['load_s']:.1f}, network {t['inference_s']:.1f}, write {t['write_s']:.1f}; {rec['backend']})")

    def skipped(path, why):
        print(f"{Path(path).name}: skipped, {why}", file=sys.stderr)

    t1 = time.perf_counter()
    records = predictor.predict_path(a.input, a.output, on_case=report, on_skip=skipped, series_uid=a.series_uid)
    if not records:
        raise SpleenError(f"{a.input}: nothing to segment; every file was skipped.")
    if len(records) > 1:  # reading and writing overlap the network across a folder
        wall = time.perf_counter() - t1
        print(f"{len(records)} cases in {wall:.1f} s ({wall / len(records):.1f} s per case; model opened in {t_open:.1f} s)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(records, indent=2))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .dicom import convert

    dv, out = convert(a.input, a.output, series_uid=a.series_uid)
    v = dv.volume
    print(f"series {dv.series.key}: {len(dv.headers)} slices, {'x'.join(map(str, v.shape))} voxels of "
          f"{'x'.join(f'{s:.3g}' for s in v.spacing)} mm, {v.axcodes} -> {out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .metrics import evaluate

    res = evaluate(a.pred, a.label, a.json)
    print(f"{'case':<24}{'dice':>8}{'hd95 mm':>10}{'pred mL':>10}{'label mL':>10}")
    for c in res["cases"]:
        hd = "n/a" if c["hd95_mm"] is None else f"{c['hd95_mm']:.2f}"
        print(f"{c['name']:<24}{c['dice']:>8.4f}{hd:>10}{c['pred_ml']:>10.1f}{c['label_ml']:>10.1f}")
    hd = "n/a" if res["mean_hd95_mm"] is None else f"{res['mean_hd95_mm']:.2f}"
    if res["n"] > 1:
        print(f"{'mean (' + str(res['n']) + ' cases)':<24}{res['mean_dice']:>8.4f}{hd:>10}")
    if a.json:
        print(f"written: {a.json}")
    return 0


# ---------------------------------------------------------------- parser
MAIN_EXAMPLES = """examples (inside the project's environment: `source .venv/bin/activate`, or call .venv/bin/spleen-seg):
  spleen-seg train --profile quick            # generate the quick data set if needed, then train (~10 min, CPU)
  spleen-seg predict --model outputs/runs/quick/best_model.pt --input ct.nii.gz --output mask.nii.gz
  spleen-seg evaluate --pred mask.nii.gz --label spleen.nii.gz
  spleen-seg reproduce                        # every notebook, the book and a summary (what `make reproduce` runs)
  spleen-seg COMMAND --help                   # the options of one command
"""
TRAIN_EXAMPLES = """examples:
  spleen-seg train                                   # the quick profile, as the tutorial runs it
  spleen-seg train --epochs 5 --out outputs/runs/try # a short run in its own folder
  spleen-seg train --resume --out outputs/runs/try   # continue an interrupted run
  spleen-seg train --profile full                    # MSD Task09 on a GPU (spleen-seg data download first)
  spleen-seg train --profile full --nproc-per-node 4 # 4 GPUs of one machine (DDP through torchrun)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job1 \\
      -m spleen_utils.cli train --profile full       # several machines: the same command on each node
"""
PREDICT_EXAMPLES = """examples:
  spleen-seg predict --model outputs/runs/quick/best_model.pt --input ct.nii.gz --output mask.nii.gz
  spleen-seg predict --model outputs/runs/quick/model.onnx --input scans/ --output masks/
  spleen-seg predict --model outputs/runs/quick/best_model.pt --input series.zip --output mask.dcm   # DICOM in, DICOM SEG out
A folder holding DICOM files (or a zip of one) is one series; --series-uid picks one of several.
In a folder of NIfTI files, files named like masks (*_label, *_spleen, *_seg, ...) or holding label maps are skipped.
"""
CONVERT_EXAMPLES = """examples:
  spleen-seg convert --input dicom/series/ --output ct.nii.gz
  spleen-seg convert --input study.zip --output ct.nii.gz --series-uid 1.2.840.113619.2.55.3.1
Slices are sorted along the slice normal; uneven spacing or gantry tilt is refused, not resampled.
"""
EVALUATE_EXAMPLES = """examples:
  spleen-seg evaluate --pred mask.nii.gz --label spleen.nii.gz
  spleen-seg evaluate --pred masks/ --label labels/ --json eval.json   # folders: paired by file name
Both must be binary masks (0 and 1) on the same grid.
"""

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .infer import PRECISIONS  # numpy only: --help stays fast

    p = argparse.ArgumentParser(
        prog="spleen-seg", description="3D spleen segmentation on CT with MONAI: data, training, inference, evaluation.",
        epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"spleen-seg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="get a dataset in the MSD layout")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    dl = dsub.add_parser("download", help="MSD Task09 Spleen from the official mirror (verified, idempotent)")
    dl.add_argument("--root", default="data", help="folder that receives Task09_Spleen/ (default: data)")
    dl.add_argument("--url", help="a mirror of Task09_Spleen.tar")
    dl.add_argument("--md5", help="expected MD5 of the archive (default: MONAI's published one, also for a --url mirror; "
                                  "'none' skips the check, with a warning)")
    dl.set_defaults(func=cmd_data_download)
    sy = dsub.add_parser("synthetic", help="write a synthetic CT dataset in the MSD layout (the quick profile's)")
    sy.add_argument("--root", default="data", help="folder that receives Synthetic_Spleen/ (default: data)")
    sy.add_argument("--cases", type=int, help="phantom training cases (default: the quick profile's)")
    sy.add_argument("--labelmap-cases", type=int, help="cases painted on each shipped real label map (default: the quick profile's)")
    sy.add_argument("--test-cases", type=int, help="test cases (default: the quick profile's)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--quiet", action="store_true", help="no progress bar")
    sy.set_defaults(func=cmd_data_synthetic)

    t = sub.add_parser("train", help="train the recipe (quick: CPU minutes on synthetic data; full: MSD on a GPU)",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    t.add_argument("--patch-size", type=_csv_ints, help="crop size, e.g. 96,96,96")
    t.add_argument("--sw-roi", type=_csv_ints, help="sliding-window size for validation, e.g. 160,160,160")
    t.add_argument("--pixdim", type=_csv_floats, help="target spacing in mm, e.g. 1.5,1.5,2.0")
    t.add_argument("--lr", type=float, help="Adam learning rate")
    t.add_argument("--cache-rate", type=float, help="share of the cases MONAI's CacheDataset keeps in memory (0-1)")
    t.add_argument("--num-workers", type=int, help="data-loading processes (default: the profile's)")
    t.add_argument("--seed", type=int, help="random seed of weights, crops and augmentation (default 0)")
    t.add_argument("--no-amp", action="store_true", help="train in fp32")
    t.add_argument("--train-sources", type=_csv_names, help="sources of the generated set that train: phantom,labelmap (default: both)")
    t.add_argument("--real-train", type=_csv_names, help="shipped real scans that train, e.g. totalseg_ct_3mm ('none': no real scan)")
    t.add_argument("--real-val", type=_csv_names, help="shipped real scans validated at every validation ('none': none)")
    t.add_argument("--real-repeats", type=int, help="how often each --real-train scan appears per epoch")
    t.add_argument("--wild", type=float, help="share of repainted crops whose soft tissues get arbitrary HU (default: 0.25)")
    t.add_argument("--appearance-prob", type=float, help="share of training crops repainted with a random CT appearance (0: no augmentation)")
    t.add_argument("--loss", choices=["dice", "dicece"], help="training loss: dice (the recipe's) or dicece (Dice + cross-entropy)")
    t.add_argument("--select-on", choices=["generated", "all"], help="validation cases that choose the best checkpoint (default: generated)")
    t.add_argument("--max-minutes", type=float, help="stop (after validating) once this much training time has passed")
    t.add_argument("--nproc-per-node", type=int, help="data-parallel processes on this machine (DDP through torchrun; one per GPU, gloo on CPU)")
    t.add_argument("--sync-bn", action="store_true", help="with several GPUs: batch-norm statistics over all processes (SyncBatchNorm)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="segment NIfTI CT volumes onto their own grid",
                        epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--model", required=True, help="best_model.pt, model.onnx or model.engine")
    pr.add_argument("--input", required=True, help="a .nii/.nii.gz file, a folder of them, or a DICOM series (folder or .zip)")
    pr.add_argument("--output", required=True, help="a file (for a file or series; .dcm writes DICOM SEG) or a folder")
    pr.add_argument("--series-uid", help="the DICOM series to segment when the input holds several")
    pr.add_argument("--backend", choices=["auto", "torch", "onnx", "tensorrt"], default="auto",
                    help="auto (default): by the model's suffix, except that a checkpoint whose own ONNX export lies beside it "
                         "(model.onnx from spleen-seg export, same weights) runs that export on the CPU in fp32: the same masks, "
                         "seconds less start-up; torch keeps PyTorch")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto (default): fp32, the precision of the tutorial's masks; bf16, fp16 or amp (bf16 on CPU, fp16 on CUDA): "
                         "autocast, faster where the hardware has it, masks measured further from the tutorial's (torch backend)")
    pr.add_argument("--no-lcc", action="store_true", help="keep every connected component (default: one: the largest, or of comparable ones the one the network is surest of)")
    pr.add_argument("--json", help="write a JSON record of each case here")
    pr.set_defaults(func=cmd_predict)

    cv = sub.add_parser("convert", help="a DICOM series (folder or zip) to a NIfTI file in Hounsfield units",
                        epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    cv.add_argument("--input", required=True, help="a folder holding a DICOM series (any file names), or a .zip of one")
    cv.add_argument("--output", required=True, help="the NIfTI file to write (.nii.gz)")
    cv.add_argument("--series-uid", help="the series to convert when the input holds several (listed if you omit it)")
    cv.set_defaults(func=cmd_convert)

    ev = sub.add_parser("evaluate", help="Dice, HD95 (mm) and volumes (mL) of predictions against labels",
                        epilog=EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--pred", required=True, help="a mask file or a folder of them")
    ev.add_argument("--label", required=True, help="a label file or a folder (paired by file name)")
    ev.add_argument("--json", help="write the results here")
    ev.set_defaults(func=cmd_evaluate)

    import importlib

    for name in EXTENSION_MODULES:
        importlib.import_module(name).register(sub)
    return p


#: modules whose ``register(subparsers)`` adds their sub-commands (deployment, service, reproduction);
#: keep their top-level imports light: ``spleen-seg --help`` imports them all
EXTENSION_MODULES: list[str] = ["spleen_utils.service", "spleen_utils.reproduce", "spleen_utils.deploy_cli", "spleen_utils.ablation",
                                 "spleen_utils.gpu_check"]


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


if __name__ == "__main__":
    sys.exit(main())
