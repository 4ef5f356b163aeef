"""Real scans as other scanners would show them: how a model and its post-processing hold up.

A model is judged on scans it never saw, and this project has three real ones. Each is also
changed here the way another scanner, protocol or field of view changes a scan: noise, a shifted
HU calibration, a softer reconstruction kernel, thicker slices, a spleen whose top lies outside
the field of view. Every version goes through one model, and both ways of keeping one component
are scored on the scan's own grid: MONAI's largest component, and the
predictor's rule (:func:`spleen_utils.postprocess.keep_one_component`).

Run: ``python -m spleen_utils.stress outputs/runs/quick [more run folders] --out stress.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import SpleenError
from .io import Volume

from .config import PROJECT_ROOT

#: the record the book reads (notebook 04); ``--out`` writes one
RECORD = PROJECT_ROOT / "book" / "records" / "stress.json"

Perturbation = Callable[[Volume, np.ndarray], "tuple[Volume, np.ndarray]"]


def _thicker(vol: Volume, label: np.ndarray, mm: float = 5.0) -> tuple[Volume, np.ndarray]:
    """Slices averaged in blocks to about ``mm`` (the label: majority of each block)."""
    k = max(1, int(round(mm / vol.spacing[2])))
    n = vol.shape[2] // k * k
    image = vol.array[:, :, :n].reshape(*vol.shape[:2], -1, k).mean(axis=3)
    lab = label[:, :, :n].reshape(*label.shape[:2], -1, k).mean(axis=3) >= 0.5
    affine = vol.affine.copy()
    affine[:3, 2] *= k
    affine[:3, 3] += vol.affine[:3, 2] * (k - 1) / 2
    return Volume(image.astype(np.float32), affine, vol.header), lab


def _top_cut(vol: Volume, label: np.ndarray, keep: float = 0.6) -> tuple[Volume, np.ndarray]:
    """The field of view ends inside the spleen: its upper 40% (along the array's last axis, the
    superior side when the affine's z increases with it) is out of view."""
    zs = np.nonzero(label.any(axis=(0, 1)))[0]
    if zs.size == 0:
        return vol, label
    if vol.affine[2, 2] > 0:
        cut = int(zs[0] + keep * (zs[-1] - zs[0]))
        return Volume(vol.array[:, :, :cut].copy(), vol.affine, vol.header), label[:, :, :cut]
    cut = int(zs[-1] - keep * (zs[-1] - zs[0]))
    affine = vol.affine.copy()
    affine[:3, 3] += vol.affine[:3, 2] * cut
    return Volume(vol.array[:, :, cut:].copy(), affine, vol.header), label[:, :, cut:]


def _noise(vol: Volume, label: np.ndarray) -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(0)
    return Volume(vol.array + rng.normal(0, 30, vol.shape).astype(np.float32), vol.affine, vol.header), label


def _smooth(vol: Volume, label: np.ndarray) -> tuple[Volume, np.ndarray]:
    from scipy import ndimage

    sigma = [1.5 / s for s in vol.spacing]
    return Volume(ndimage.gaussian_filter(vol.array, sigma).astype(np.float32), vol.affine, vol.header), label


def _shift(hu: float) -> Perturbation:
    return lambda vol, label: (Volume(vol.array + np.float32(hu), vol.affine, vol.header), label)


#: name -> (volume, label) -> (changed volume, its label)
PERTURBATIONS: dict[str, Perturbation] = {
    "as stored": lambda vol, label: (vol, label),
    "noise 30 HU": _noise,
    "HU +30": _shift(30.0),
    "HU -30": _shift(-30.0),
    "smooth 1.5 mm": _smooth,
    "5 mm slices": _thicker,
    "top 40% cut": _top_cut,
}


def stress(run: str | Path, items: list[dict[str, str]], progress: bool = False) -> list[dict[str, Any]]:
    """One row per real scan and perturbation: the Dice of each way of keeping one component
    (:func:`spleen_utils.evaluate.component_rules`: the predictor once with every component,
    once with its own rule).

    Perturbations that would not change a scan (5 mm slices of a scan whose slices are thicker
    already) are left out."""
    from .evaluate import component_rules
    from .infer import Predictor
    from .io import load_nifti
    from .runs import RunDir

    model = RunDir(run).best_model
    raw = Predictor.from_path(model, backend="torch", device="cpu", precision="fp32", lcc=False)
    kept = Predictor.from_path(model, backend="torch", device="cpu", precision="fp32")
    rows = []
    for item in items:
        vol = load_nifti(item["image"])
        label = load_nifti(item["label"], dtype=None).array > 0
        for name, change in PERTURBATIONS.items():
            if name == "5 mm slices" and vol.spacing[2] >= 4.0:
                continue
            v, lab = change(vol, label)
            r = component_rules(raw, kept, v, lab)
            row = {"run": str(run), "scan": item["name"], "version": name,
                   **{k: r[k] for k in ("dice_raw", "dice_largest", "dice_kept")}}
            rows.append(row)
            if progress:
                print(f"{Path(run).name} {item['name']} {name}: largest {row['dice_largest']:.3f}, kept {row['dice_kept']:.3f}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean Dice and the masks with no spleen in them (Dice < 0.05), per rule."""
    out: dict[str, Any] = {"masks": len(rows)}
    for rule in ("largest", "kept"):
        d = [r[f"dice_{rule}"] for r in rows]
        out[rule] = {"mean_dice": float(np.mean(d)) if d else None, "no_spleen": sum(x < 0.05 for x in d)}
    out["differ"] = sum(abs(r["dice_largest"] - r["dice_kept"]) > 1e-9 for r in rows)
    return out


def run_description(run: str | Path) -> dict[str, Any]:
    """What a run folder's model is: its profile, seed, data and training time (from ``run.json``
    and ``summary.json``; empty fields when the run did not record them)."""
    from .runs import RUN_RECORD, SUMMARY, RunDir

    cfg, summ = (RunDir(run).read(RUN_RECORD) or {}).get("config", {}), RunDir(run).read(SUMMARY) or {}
    return {"profile": cfg.get("profile"), "seed": cfg.get("seed"), "data": cfg.get("data_root"),
            "best_epoch": summ.get("best_epoch"), "train_seconds": summ.get("train_seconds")}


def main(argv: list[str] | None = None) -> int:
    import shlex

    from .evaluate import real_cases
    from .provenance import hardware, utc_now, write_json
    from .runs import BEST_MODEL

    ap = argparse.ArgumentParser(prog="python -m spleen_utils.stress", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help=f"run folders holding {BEST_MODEL}")
    ap.add_argument("--out", help="write the record here (JSON: the command, date, machine, runs, rows and summary)")
    a = ap.parse_args(argv)
    items, why = real_cases(validation=True)
    print(why)
    try:
        rows = [r for run in a.runs for r in stress(run, items, progress=True)]
    except SpleenError as e:  # a run without a model, a scan that cannot be read: one sentence
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    result = {"what": "real scans and stressed versions of them through two ways of keeping one component "
                      "(spleen_utils.stress)",
              "command": f"{ap.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}",
              "date": utc_now(), "hardware": hardware("cpu"),
              "runs": {str(run): run_description(run) for run in a.runs},
              "rows": rows, "summary": summary(rows)}
    print(json.dumps(result["summary"], indent=1))
    if a.out:
        try:
            write_json(result, a.out)  # atomic: a failed write leaves the old record whole
        except OSError as e:
            print(f"{ap.prog}: error: cannot write {a.out} ({e.strerror or e}); choose another --out.", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
