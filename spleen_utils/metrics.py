"""Dice, 95th-percentile Hausdorff distance (mm) and volumes (mL), at the label's own geometry.

Empty masks, by design:
- Dice: both empty -> 1.0 (nothing to find, nothing found: perfect agreement); exactly one
  empty -> 0.0.
- HD95: both empty -> 0.0; exactly one empty -> ``None`` (undefined: there is no surface to
  measure to), written as ``null`` in JSON and left out of the mean, which then says how many
  cases it covers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .io import case_name, is_nifti_name, load_nifti, same_grid


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    pred = np.asarray(pred) > 0
    label = np.asarray(label) > 0
    total = int(pred.sum()) + int(label.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, label).sum()) / total


def hd95(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]) -> float | None:
    """Symmetric 95th-percentile surface distance in mm (MONAI, spacing-aware)."""
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(pred) > 0
    label = np.asarray(label) > 0
    p_any, l_any = bool(pred.any()), bool(label.any())
    if not p_any and not l_any:
        return 0.0
    if p_any != l_any:
        return None
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(label[None, None].astype(np.float32))
    d = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    return float(d.item())


def volume_ml(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def evaluate_case(pred_path: str | Path, label_path: str | Path) -> dict:
    pred = load_nifti(pred_path, what="prediction", dtype=None)
    label = load_nifti(label_path, what="label", dtype=None)
    if not same_grid(pred, label):
        raise DataError(
            f"{pred_path}: the prediction's grid {pred.shape} {pred.axcodes} does not match its label's "
            f"{label.shape} {label.axcodes} ({label_path}); predict onto the image's own grid."
        )
    for vol, path, what in ((label, label_path, "--label"), (pred, pred_path, "--pred")):
        a = vol.array
        if np.any((a != 0) & (a != 1)):
            values = np.unique(a[(a != 0) & (a != 1)])
            shown = ", ".join(f"{v:g}" for v in values[:3]) + (", ..." if values.size > 3 else "")
            raise DataError(f"{path}: {what} must be a binary spleen mask (0 and 1), but it also holds {shown}; "
                            "is it a CT or a multi-organ label map?")
    p, l = pred.array > 0, label.array > 0
    return {
        "name": case_name(pred_path),
        "dice": dice(p, l),
        "hd95_mm": hd95(p, l, label.spacing),
        "pred_ml": volume_ml(p, label.spacing),
        "label_ml": volume_ml(l, label.spacing),
    }


def _pairs(pred: Path, label: Path) -> list[tuple[Path, Path]]:
    for p, what in ((pred, "--pred"), (label, "--label")):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder ({what}).")
    if pred.is_file() or label.is_file():
        if not (pred.is_file() and label.is_file()):
            raise DataError("--pred and --label must both be files or both be folders.")
        return [(pred, label)]
    labels = {case_name(f): f for f in sorted(label.iterdir()) if is_nifti_name(f) and not f.name.startswith(".")}
    preds = {case_name(f): f for f in sorted(pred.iterdir()) if is_nifti_name(f) and not f.name.startswith(".")}
    common = sorted(set(labels) & set(preds))
    if not common:
        raise DataError(f"no prediction in {pred} has a label of the same name in {label}.")
    return [(preds[n], labels[n]) for n in common]


def summarize(cases: list[dict]) -> dict:
    dices = [c["dice"] for c in cases]
    hds = [c["hd95_mm"] for c in cases if c["hd95_mm"] is not None and math.isfinite(c["hd95_mm"])]
    return {
        "cases": cases,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_hd95_mm": float(np.mean(hds)) if hds else None,
        "hd95_cases": len(hds),
        "n": len(cases),
    }


def evaluate(pred: str | Path, label: str | Path, json_out: str | Path | None = None) -> dict:
    """Score predictions against labels (files, or folders paired by case name)."""
    result = summarize([evaluate_case(p, l) for p, l in _pairs(Path(pred), Path(label))])
    if json_out is not None:
        from .provenance import write_json

        write_json(result, json_out)
    return result
