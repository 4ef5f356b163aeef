"""Figures of the tutorial: the data, the training, the predictions and the measurements.

Every function returns a :class:`matplotlib.figure.Figure` drawn with the Agg canvas (no pyplot
state, no GUI, no figure left open); figures of CT slices are :class:`~.view.SliceFigure`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .tables import natural_key, read_metrics
from .view import (DISPLAY_WINDOW, GT_COLOR, PRED_COLOR, SliceFigure, ViewCase, _axial, _coronal, _draw,
                   _legend, largest_slice, spleen_slices, to_lps)

# ---------------------------------------------------------------------------------------------
# data exploration


def case_gallery(cases: Sequence[ViewCase], title: str = "", window: Sequence[float] = DISPLAY_WINDOW) -> Figure:
    """One row per case: the axial and the coronal slice through the spleen, label overlaid."""
    fig = SliceFigure(figsize=(6.4, 2.9 * len(cases) + 0.5), layout="constrained")
    axes = fig.subplots(len(cases), 2, squeeze=False)
    for row, c in zip(axes, cases):
        sx, sy, sz = c.spacing
        z = largest_slice(c.label, 2)
        z = c.shape[2] // 2 if z is None else z
        y = largest_slice(c.label, 1)
        y = c.shape[1] // 2 if y is None else y
        lab = c.label
        _draw(row[0], _axial(c.image, z), None if lab is None else _axial(lab, z), None, sy / sx, window,
              f"{c.name}: axial {z + 1}/{c.shape[2]}")
        _draw(row[1], _coronal(c.image, y), None if lab is None else _coronal(lab, y), None, sz / sx, window,
              f"coronal {y + 1}/{c.shape[1]}")
    if title:
        fig.suptitle(title, fontsize=10)
    _legend(fig, pred=False, label=any(c.label is not None for c in cases))
    return fig


def geometry_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Voxel sizes, slice counts and spleen volumes of a dataset (from :func:`dataset_table`)."""
    rows = sorted(rows, key=lambda r: natural_key(r["case"]))
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    inplane = [float(np.mean(r["spacing_mm"][:2])) for r in rows]
    thick = [r["spacing_mm"][2] for r in rows]
    orient = [r["orientation"] for r in rows]
    for o in sorted(set(orient)):
        idx = [i for i, v in enumerate(orient) if v == o]
        ax1.scatter([inplane[i] for i in idx], [thick[i] for i in idx], label=o, s=30)
    ax1.set_xlabel("in-plane voxel size (mm)")
    ax1.set_ylabel("slice spacing (mm)")
    # the legend sits outside the axes, where it cannot hide a point
    ax1.legend(title="stored as", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax1.set_title("voxel size per case", fontsize=10)
    names = [r["case"].replace("spleen_", "") for r in rows]
    ax2.bar(names, [r["shape"][2] for r in rows], color="#4C72B0")
    ax2.set_xlabel("case")
    ax2.set_ylabel("slices (3rd array axis)")
    ax2.set_title("slices per case", fontsize=10)
    if rows and all("spleen_ml" in r for r in rows):
        ax3.bar(names, [r["spleen_ml"] for r in rows], color=GT_COLOR)
        ax3.set_ylabel("spleen volume (mL)")
        ax3.set_title("spleen volume per case", fontsize=10)
        ax3.set_xlabel("case")
    else:
        ax3.set_axis_off()
    for ax in (ax2, ax3):
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def hu_histograms(
    items: Iterable[dict[str, str]],
    bins: np.ndarray | None = None,
    body_threshold: float = -500.0,
) -> dict[str, np.ndarray]:
    """Voxel counts per HU bin inside the spleen and in the rest of the body (HU > ``body_threshold``).

    Accumulated case by case, so memory stays at one volume.
    """
    from ..io import load_nifti

    bins = np.arange(-400, 401, 5, dtype=np.float64) if bins is None else np.asarray(bins, dtype=np.float64)
    inside = np.zeros(len(bins) - 1, dtype=np.int64)
    outside = np.zeros(len(bins) - 1, dtype=np.int64)
    for item in items:
        img = load_nifti(item["image"]).array
        lab = load_nifti(item["label"], what="label", dtype=None).array > 0
        inside += np.histogram(img[lab], bins=bins)[0]
        outside += np.histogram(img[~lab & (img > body_threshold)], bins=bins)[0]
    return {"bins": bins, "spleen": inside, "body": outside}


def hu_histogram_figure(hist: dict[str, np.ndarray], hu_window: Sequence[float] | None = None, title: str = "") -> Figure:
    """Normalised HU histograms inside vs outside the spleen, with the recipe's HU window shaded."""
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    bins = hist["bins"]
    centers = 0.5 * (bins[1:] + bins[:-1])
    for key, color, lab in (("body", "#777777", "rest of the body (HU > -500)"), ("spleen", GT_COLOR, "spleen")):
        counts = hist[key].astype(np.float64)
        total = counts.sum()
        dens = counts / (total * np.diff(bins)) if total else counts
        ax.fill_between(centers, dens, step="mid", alpha=0.35, color=color)
        ax.step(centers, dens, where="mid", color=color, label=f"{lab} ({int(total):,} voxels)")
    if hu_window is not None:
        ax.axvspan(hu_window[0], hu_window[1], color="#4C72B0", alpha=0.08, label=f"recipe HU window {list(hu_window)}")
    ax.set_xlabel("Hounsfield units")
    ax.set_ylabel("fraction of voxels per HU")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


#: the organs whose Hounsfield units the real-vs-generated figure compares
ORGANS = ("spleen", "liver", "kidney")


def organ_masks(item: dict[str, str]) -> dict[str, np.ndarray]:
    """Masks of :data:`ORGANS` on an item's image grid, from whatever map it has.

    ``tissue`` (a generated case's tissue codes) or ``organs`` (a TotalSegmentator map: spleen 1,
    kidneys 2 and 3, liver 5) give all three; otherwise the ``label`` gives the spleen only.
    """
    from .. import appearance as ap
    from ..io import load_nifti

    if item.get("tissue"):
        t = np.asarray(load_nifti(item["tissue"], what="label", dtype=None).array)
        return {"spleen": t == ap.SPLEEN, "liver": t == ap.LIVER, "kidney": (t == ap.KIDNEY_CORTEX) | (t == ap.KIDNEY_MEDULLA)}
    if item.get("organs"):
        o = np.asarray(load_nifti(item["organs"], what="label", dtype=None).array)
        return {"spleen": o == 1, "liver": o == 5, "kidney": (o == 2) | (o == 3)}
    return {"spleen": np.asarray(load_nifti(item["label"], what="label", dtype=None).array) > 0}


def organ_hu_histograms(groups: dict[str, Sequence[dict[str, str]]], bins: np.ndarray | None = None) -> dict[str, Any]:
    """Voxel counts per HU bin of each organ of :data:`ORGANS`, per group of cases."""
    from ..io import load_nifti

    bins = np.arange(-150, 351, 5, dtype=np.float64) if bins is None else np.asarray(bins, dtype=np.float64)
    out: dict[str, Any] = {"bins": bins, "groups": {}}
    for group, items in groups.items():
        counts = {}
        for item in items:
            img = np.asarray(load_nifti(item["image"]).array)
            for organ, mask in organ_masks(item).items():
                counts[organ] = counts.get(organ, 0) + np.histogram(img[mask], bins=bins)[0]
        out["groups"][group] = counts
    return out


def organ_hu_figure(hist: dict[str, Any], hu_window: Sequence[float] | None = None, title: str = "") -> Figure:
    """One panel per organ: the HU distribution of each group of cases (normalised), window shaded."""
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    axes = fig.subplots(1, len(ORGANS), sharey=False)
    bins = hist["bins"]
    centers = 0.5 * (bins[1:] + bins[:-1])
    styles = ["-", "--", "-.", ":"]
    for ax, organ in zip(axes, ORGANS):
        for k, (group, counts) in enumerate(hist["groups"].items()):
            c = np.asarray(counts.get(organ, []), dtype=np.float64)
            if c.size == 0 or c.sum() == 0:
                continue
            median = centers[np.searchsorted(np.cumsum(c), c.sum() / 2)]
            ax.step(centers, c / (c.sum() * np.diff(bins)), where="mid", linestyle=styles[k % len(styles)],
                    label=f"{group} (median {median:.0f})")
        if hu_window is not None:
            ax.axvspan(hu_window[0], hu_window[1], color="#4C72B0", alpha=0.08)
        ax.set_title(organ, fontsize=10)
        ax.set_xlabel("Hounsfield units")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of voxels per HU")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def appearance_gallery(tissue: str | Path, seeds: Sequence[int] = (0, 1, 2, 3), title: str = "",
                       window: Sequence[float] = DISPLAY_WINDOW) -> Figure:
    """One axial slice of a generated case's tissue map painted in several random appearances."""
    from .. import appearance as ap
    from ..io import load_nifti

    vol = load_nifti(tissue, what="label", dtype=None)
    t, spacing = to_lps(np.asarray(vol.array).astype(np.uint8), vol.affine)
    z = largest_slice(t == ap.SPLEEN, 2)
    z = t.shape[2] // 2 if z is None else z
    slab = t[:, :, max(z - 4, 0): z + 5]
    zz = z - max(z - 4, 0)
    fig = SliceFigure(figsize=(2.6 * len(seeds), 2.9), layout="constrained")
    axes = fig.subplots(1, len(seeds), squeeze=False)[0]
    for ax, seed in zip(axes, seeds):
        rng = np.random.default_rng(seed)
        look = ap.draw_appearance(rng)
        hu = ap.paint(slab, spacing, rng, appearance=look)
        _draw(ax, _axial(hu, zz), _axial(slab == ap.SPLEEN, zz), None, spacing[1] / spacing[0], window,
              f"{look['phase']}: spleen {look['mean'][ap.SPLEEN]:.0f} HU")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# training


def training_curves(metrics: str | Path | Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Training loss per epoch and validation Dice at each validation, best epoch marked."""
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    if not rows:
        raise ValueError("no epochs recorded yet")
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r["epoch"] for r in rows], [np.nan if r["loss"] is None else r["loss"] for r in rows], color="#4C72B0", lw=1.2)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("Dice loss (training crops)")
    ax1.set_title("training loss", fontsize=10)
    val = [(r["epoch"], r["val_dice"]) for r in rows if r.get("val_dice") is not None]
    if val:
        ep, d = zip(*val)
        sources = sorted({k for r in rows for k in (r.get("val_dice_by_source") or {})})
        ax2.plot(ep, d, "o-", color=GT_COLOR, ms=4, label="selection metric" if sources else None)
        for k, src in enumerate(sources):  # each source's own mean, real held-out scans included
            pts = [(r["epoch"], r["val_dice_by_source"][src]) for r in rows if src in (r.get("val_dice_by_source") or {})]
            ax2.plot(*zip(*pts), ls=("--", ":", "-.")[k % 3], lw=1.1, label=src)
        best = int(np.argmax(d))
        ax2.plot([ep[best]], [d[best]], marker="*", ms=14, color=PRED_COLOR, ls="none", label=f"best {d[best]:.3f} (epoch {ep[best]})")
        ax2.legend(fontsize=8, loc="lower right")
        ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("mean Dice (validation cases)")
    if len(ax2.get_legend_handles_labels()[0]) > 2:
        ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title("validation Dice (sliding window)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# predictions


def prediction_overlay(case: ViewCase, n_slices: int = 3, title: str = "", window: Sequence[float] = DISPLAY_WINDOW) -> Figure:
    """``n_slices`` axial slices across the spleen with ground truth and prediction contours."""
    ref = case.label if case.label is not None and case.label.any() else case.pred
    zs = spleen_slices(ref, n_slices, case.shape[2])
    sx, sy, _ = case.spacing
    fig = SliceFigure(figsize=(3.1 * len(zs), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(zs)))
    for ax, z in zip(axes, zs):
        lab = None if case.label is None else _axial(case.label, z)
        pred = None if case.pred is None else _axial(case.pred, z)
        _draw(ax, _axial(case.image, z), lab, pred, sy / sx, window, f"axial {z + 1}/{case.shape[2]}")
    fig.suptitle(title or case.name, fontsize=10)
    _legend(fig, pred=case.pred is not None, label=case.label is not None)
    return fig


def comparison_figure(cases: Sequence[tuple[str, ViewCase]], title: str = "", z: int | None = None,
                      window: Sequence[float] = DISPLAY_WINDOW) -> Figure:
    """The same axial slice ``z`` of several versions of one case side by side (e.g. before/after LCC).

    ``z`` defaults to the middle of the first version's spleen.
    """
    fig = SliceFigure(figsize=(3.1 * len(cases), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cases)))
    first = cases[0][1]
    if z is None:
        ref = first.label if first.label is not None and first.label.any() else first.pred
        z = spleen_slices(ref, 1, first.shape[2])[0]
    for ax, (sub, c) in zip(axes, cases):
        sx, sy, _ = c.spacing
        _draw(ax, _axial(c.image, z), None if c.label is None else _axial(c.label, z),
              None if c.pred is None else _axial(c.pred, z), sy / sx, window, sub)
    if title:
        fig.suptitle(title, fontsize=10)
    _legend(fig, pred=any(c.pred is not None for _, c in cases), label=any(c.label is not None for _, c in cases))
    return fig


def grouped_bars(names: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str, title: str = "",
                 ylim: tuple[float, float] | None = None, colors: Sequence[Any] | None = None) -> Figure:
    """One group of bars per name (e.g. per case), one bar per series (e.g. per backend)."""
    palette = list(colors or ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"])
    fig = Figure(figsize=(max(4.5, 0.45 * len(names) * max(1, len(series)) + 2.5), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for k, (label, values) in enumerate(series.items()):
        vals = [np.nan if v is None else float(v) for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=label, color=palette[k % len(palette)])
    rotate = len(names) > 4 or max((len(n) for n in names), default=0) > 12
    ax.set_xticks(x, names, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def volume_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Grouped bars per case: the label's volume and the predicted volume(s) in mL.

    Each row has ``name`` and any of ``label_ml``, ``ml_before`` (raw prediction), ``ml_after``
    (after post-processing) or ``pred_ml``.
    """
    spec = [("label_ml", "ground truth", GT_COLOR), ("ml_before", "prediction, raw", "#BBBBBB"),
            ("ml_after", "prediction, largest component", PRED_COLOR), ("pred_ml", "prediction", PRED_COLOR)]
    spec = [s for s in spec if any(r.get(s[0]) is not None for r in rows)]
    series = {label: [r.get(key) for r in rows] for key, label, _ in spec}
    fig = grouped_bars([r["name"] for r in rows], series, "spleen volume (mL)", title, colors=[c for *_, c in spec])
    if len(series) == 1:
        fig.axes[0].legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# benchmarks, images


def bar_chart(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str = "",
              errors: Sequence[float] | None = None, note: str = "") -> Figure:
    """A plain bar chart (benchmark rows, cross-backend Dice, ...) with the values printed on the bars."""
    fig = Figure(figsize=(max(4.5, 1.1 * len(labels) + 2), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    bars = ax.bar(x, values, yerr=errors, color="#4C72B0", capsize=3)
    for b, v in zip(bars, values):
        if v is not None and math.isfinite(v):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8, rotation=20 if len(labels) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#555555")
    return fig


def agreement_heatmap(names: Sequence[str], matrix: np.ndarray, title: str = "") -> Figure:
    """A square matrix of pairwise agreement (e.g. the Dice of two backends' masks), values printed."""
    m = np.asarray(matrix, dtype=np.float64)
    fig = Figure(figsize=(1.3 * len(names) + 2.2, 1.1 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    lo = float(np.nanmin(m)) if m.size else 0.0
    im = ax.imshow(m, cmap="viridis", vmin=min(lo, 0.99), vmax=1.0)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.4f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > (min(lo, 0.99) + 1.0) / 2 else "white")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def figure_to_png(fig: Figure, path: str | Path | None = None, dpi: int = 100) -> bytes:
    """PNG bytes of ``fig`` (also written to ``path`` when given)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
