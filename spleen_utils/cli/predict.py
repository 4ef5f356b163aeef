"""``spleen-seg predict``, ``convert`` and ``evaluate``: masks on each input's own grid, DICOM to
NIfTI, and Dice / HD95 / volumes against labels. With an ONNX model ``predict`` imports neither
torch nor MONAI (tests/test_startup.py checks it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SpleenError
from .args import add_command

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


def cmd_predict(a: argparse.Namespace) -> int:
    # with an ONNX model nothing below imports torch or MONAI (tests/test_startup.py checks it)
    import time

    from ..infer import Predictor

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
        from ..provenance import write_json

        write_json(records, a.json)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from ..dicom import convert

    dv, out = convert(a.input, a.output, series_uid=a.series_uid)
    v = dv.volume
    print(f"series {dv.series.key}: {len(dv.headers)} slices, {'x'.join(map(str, v.shape))} voxels of "
          f"{'x'.join(f'{s:.3g}' for s in v.spacing)} mm, {v.axcodes} -> {out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..metrics import evaluate

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


def register(sub) -> None:
    from ..infer import PRECISIONS  # numpy only: --help stays fast

    pr = add_command(sub, "predict", cmd_predict, help="segment NIfTI CT volumes onto their own grid", epilog=PREDICT_EXAMPLES)
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

    cv = add_command(sub, "convert", cmd_convert, help="a DICOM series (folder or zip) to a NIfTI file in Hounsfield units", epilog=CONVERT_EXAMPLES)
    cv.add_argument("--input", required=True, help="a folder holding a DICOM series (any file names), or a .zip of one")
    cv.add_argument("--output", required=True, help="the NIfTI file to write (.nii.gz)")
    cv.add_argument("--series-uid", help="the series to convert when the input holds several (listed if you omit it)")

    ev = add_command(sub, "evaluate", cmd_evaluate, help="Dice, HD95 (mm) and volumes (mL) of predictions against labels", epilog=EVALUATE_EXAMPLES)
    ev.add_argument("--pred", required=True, help="a mask file or a folder of them")
    ev.add_argument("--label", required=True, help="a label file or a folder (paired by file name)")
    ev.add_argument("--json", help="write the results here")

