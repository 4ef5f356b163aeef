"""Tables of the tutorial: Markdown tables, the per-case geometry of a dataset, a run's metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def dataset_table(dataset_dir: str | Path, section: str = "training", with_volume: bool = True) -> list[dict[str, Any]]:
    """Per case: shape, spacing (mm), storage orientation and spleen volume (mL)."""
    import nibabel as nib

    from ..data import load_datalist
    from ..io import case_name, load_nifti

    rows = []
    for item in load_datalist(dataset_dir, section):
        img = nib.load(item["image"])
        spacing = [float(s) for s in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))]
        row: dict[str, Any] = {
            "case": case_name(item["image"]),
            "shape": [int(s) for s in img.shape[:3]],
            "spacing_mm": [round(s, 3) for s in spacing],
            "orientation": "".join(nib.aff2axcodes(img.affine)),
        }
        if with_volume and "label" in item:
            lab = load_nifti(item["label"], what="label", dtype=None).array
            row["spleen_ml"] = round(float(np.count_nonzero(lab)) * float(np.prod(spacing)) / 1000.0, 1)
        rows.append(row)
    return sorted(rows, key=lambda r: natural_key(r["case"]))  # spleen_2 before spleen_10, as the figure


def natural_key(name: str) -> list[Any]:
    """Sort key that orders the numbers inside names by value (``spleen_2`` before ``spleen_10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a line cut by an interruption is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A Markdown table of ``rows`` (dicts); floats formatted with ``floatfmt``, None as n/a."""
    if not rows:
        return "_(no rows)_"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if v is None:
            return "n/a"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, float):
            return format(v, floatfmt)
        if isinstance(v, (list, tuple)) and not v:
            return "none"
        if isinstance(v, (list, tuple)):
            return " × ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
