"""Figures, GIFs and the slice viewer of the tutorial.

Everything here is headless: figures are :class:`matplotlib.figure.Figure` objects drawn with the
Agg canvas (no pyplot state, no GUI, no figure left open), GIFs are written with imageio. In a
Jupyter kernel a returned figure shows as a PNG (the module registers the inline formatter).

Display convention: volumes are reoriented to LPS before display, so an axial slice is shown the
radiological way (patient's left on the image's right, anterior at the top) whatever orientation
the file stores, and a coronal slice has the head at the top. Ground truth is drawn in green,
predictions in orange.

Functions that read a whole dataset take a dataset folder in the MSD layout; functions that draw
one case take a :class:`ViewCase` (see :func:`load_view`).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: abdominal soft-tissue display window (level 40 HU, width 400 HU)
DISPLAY_WINDOW = (-160.0, 240.0)
GT_COLOR = (0.20, 0.85, 0.30)  # green
PRED_COLOR = (1.00, 0.55, 0.00)  # orange
SYNTHETIC_NOTE = "synthetic quick-profile data"


def _register_inline_formatter() -> None:
    """Let a returned Figure show inline in a Jupyter kernel (pyplot is never imported here)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not hasattr(shell, "kernel"):
            return
        from IPython.core.pylabtools import select_figure_formats

        select_figure_formats(shell, {"png"}, bbox_inches="tight", dpi=90)
    except Exception:  # no IPython, or an IPython without these helpers: figures still save
        pass


_register_inline_formatter()


# ---------------------------------------------------------------------------------------------
# volumes for display


@dataclass
class ViewCase:
    """One case for display: arrays in LPS order and the voxel size (mm) along those axes."""

    name: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    label: np.ndarray | None = None
    pred: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]


def to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` (with ``affine``) reoriented to LPS, and its voxel size along the new axes."""
    from nibabel import orientations as nio

    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("L", "P", "S")))
    out = nio.apply_orientation(array, transform)
    new_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        new_spacing[int(target)] = float(spacing[axis])
    return np.ascontiguousarray(out), tuple(new_spacing)  # type: ignore[return-value]


def _volume(x):
    from .io import Volume, load_nifti

    if x is None or isinstance(x, Volume):
        return x
    return load_nifti(x, dtype=None)


def load_view(image, label=None, pred=None, name: str | None = None) -> ViewCase:
    """A :class:`ViewCase` from NIfTI paths (or :class:`~spleen_utils.io.Volume` objects).

    ``label`` and ``pred`` (paths, Volumes or arrays in the image's voxel order) must lie on the
    image's grid (a prediction from :class:`~spleen_utils.infer.Predictor` does).
    """
    from .io import case_name

    img = _volume(image)
    arr, spacing = to_lps(np.asarray(img.array, dtype=np.float32), img.affine)
    masks = []
    for what, m in (("label", label), ("prediction", pred)):
        if m is None:
            masks.append(None)
            continue
        mask = np.asarray(m) if isinstance(m, np.ndarray) else np.asarray(_volume(m).array)
        if tuple(mask.shape) != img.shape:
            raise ValueError(f"the {what} grid {tuple(mask.shape)} differs from the image grid {img.shape}")
        masks.append(to_lps(mask > 0, img.affine)[0])
    if name is None:
        name = case_name(img.path) if img.path is not None else "case"
    return ViewCase(name=name, image=arr, spacing=spacing, label=masks[0], pred=masks[1])


def window01(array: np.ndarray, window: Sequence[float] = DISPLAY_WINDOW) -> np.ndarray:
    """HU mapped to [0, 1] through a display window (clipped)."""
    lo, hi = float(window[0]), float(window[1])
    return np.clip((np.asarray(array, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def spleen_slices(mask: np.ndarray | None, n: int, depth: int) -> list[int]:
    """``n`` axial slice indices spread over the mask's extent (over the volume if it is empty)."""
    if mask is not None and mask.any():
        zs = np.nonzero(mask.any(axis=(0, 1)))[0]
        lo, hi = int(zs.min()), int(zs.max())
    else:
        lo, hi = 0, depth - 1
    if n == 1:
        return [(lo + hi) // 2]
    return sorted({int(round(v)) for v in np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n)})


def largest_slice(mask: np.ndarray | None, axis: int = 2) -> int | None:
    """Index of the slice along ``axis`` with the most mask voxels (``None`` if empty)."""
    if mask is None or not mask.any():
        return None
    other = tuple(a for a in range(3) if a != axis)
    return int(np.argmax(mask.sum(axis=other)))


def _axial(a: np.ndarray, z: int) -> np.ndarray:
    return a[:, :, z].T  # rows: posterior downwards, columns: towards the patient's left


def _coronal(a: np.ndarray, y: int) -> np.ndarray:
    return a[:, y, :].T[::-1]  # rows: head at the top


def _draw(ax, img2d, label2d, pred2d, aspect, window, title=None) -> None:
    ax.imshow(window01(img2d, window), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    for m, color, fill in ((label2d, GT_COLOR, 0.25), (pred2d, PRED_COLOR, 0.0)):
        if m is None or not m.any():
            continue
        if fill:
            rgba = np.zeros((*m.shape, 4), dtype=np.float32)
            rgba[m] = (*color, fill)
            ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.contour(m.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _legend(fig: Figure, pred: bool = True, label: bool = True) -> None:
    from matplotlib.lines import Line2D

    handles = []
    if label:
        handles.append(Line2D([], [], color=GT_COLOR, lw=2, label="ground truth"))
    if pred:
        handles.append(Line2D([], [], color=PRED_COLOR, lw=2, label="prediction"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9)


# ---------------------------------------------------------------------------------------------
# data exploration


def case_gallery(cases: Sequence[ViewCase], title: str = "", window: Sequence[float] = DISPLAY_WINDOW) -> Figure:
    """One row per case: the axial and the coronal slice through the spleen, label overlaid."""
    fig = Figure(figsize=(6.4, 2.9 * len(cases) + 0.5), layout="constrained")
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


def dataset_table(dataset_dir: str | Path, section: str = "training", with_volume: bool = True) -> list[dict[str, Any]]:
    """Per case: shape, spacing (mm), storage orientation and spleen volume (mL)."""
    import nibabel as nib

    from .data import load_datalist
    from .io import case_name, load_nifti

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
    from .io import load_nifti

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
    from . import appearance as ap
    from .io import load_nifti

    if item.get("tissue"):
        t = np.asarray(load_nifti(item["tissue"], what="label", dtype=None).array)
        return {"spleen": t == ap.SPLEEN, "liver": t == ap.LIVER, "kidney": (t == ap.KIDNEY_CORTEX) | (t == ap.KIDNEY_MEDULLA)}
    if item.get("organs"):
        o = np.asarray(load_nifti(item["organs"], what="label", dtype=None).array)
        return {"spleen": o == 1, "liver": o == 5, "kidney": (o == 2) | (o == 3)}
    return {"spleen": np.asarray(load_nifti(item["label"], what="label", dtype=None).array) > 0}


def organ_hu_histograms(groups: dict[str, Sequence[dict[str, str]]], bins: np.ndarray | None = None) -> dict[str, Any]:
    """Voxel counts per HU bin of each organ of :data:`ORGANS`, per group of cases."""
    from .io import load_nifti

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
    from . import appearance as ap
    from .io import load_nifti

    vol = load_nifti(tissue, what="label", dtype=None)
    t, spacing = to_lps(np.asarray(vol.array).astype(np.uint8), vol.affine)
    z = largest_slice(t == ap.SPLEEN, 2)
    z = t.shape[2] // 2 if z is None else z
    slab = t[:, :, max(z - 4, 0): z + 5]
    zz = z - max(z - 4, 0)
    fig = Figure(figsize=(2.6 * len(seeds), 2.9), layout="constrained")
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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (a line cut by an interruption is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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
    fig = Figure(figsize=(3.1 * len(zs), 3.6), layout="constrained")
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
    fig = Figure(figsize=(3.1 * len(cases), 3.6), layout="constrained")
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
# frames, GIFs and the slice viewer


def frame_indices(n_slices: int, max_frames: int = 48) -> list[int]:
    """Evenly spaced slice indices, at most ``max_frames`` of them, first and last included."""
    if n_slices <= 0 or max_frames <= 0:
        return []
    if n_slices <= max_frames:
        return list(range(n_slices))
    if max_frames == 1:
        return [n_slices // 2]
    return [int(round(v)) for v in np.linspace(0, n_slices - 1, max_frames)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(mask, mode="inner") if mask.any() else mask


def overlay_rgb(img2d: np.ndarray, label2d: np.ndarray | None = None, pred2d: np.ndarray | None = None,
                window: Sequence[float] = DISPLAY_WINDOW) -> np.ndarray:
    """uint8 RGB of a windowed slice, ground truth tinted green and outlined, prediction outlined orange."""
    g = window01(img2d, window)
    rgb = np.repeat(g[..., None], 3, axis=2)
    if label2d is not None and label2d.any():
        rgb[label2d] = 0.75 * rgb[label2d] + 0.25 * np.asarray(GT_COLOR)
        rgb[_boundary(label2d)] = GT_COLOR
    if pred2d is not None and pred2d.any():
        rgb[_boundary(pred2d)] = PRED_COLOR
    return (rgb * 255 + 0.5).astype(np.uint8)


def axial_frame(case: ViewCase, z: int, width: int = 256, window: Sequence[float] = DISPLAY_WINDOW) -> np.ndarray:
    """uint8 RGB of axial slice ``z``, ``width`` pixels wide with square millimetres.

    The slice and its masks are resized first and the outlines drawn at display resolution, so
    they stay one crisp pixel wide.
    """
    from skimage.transform import resize

    sx, sy, _ = case.spacing
    img = _axial(case.image, z)
    height = max(1, int(round(width * img.shape[0] * sy / (img.shape[1] * sx))))
    size = (height, width)
    img = resize(img, size, order=1, preserve_range=True, anti_aliasing=True)

    def mask(m):
        return None if m is None else resize(_axial(m, z).astype(np.float32), size, order=1, anti_aliasing=False) >= 0.5

    return overlay_rgb(img, mask(case.label), mask(case.pred), window)


def _caption(frame: np.ndarray, text: str) -> np.ndarray:
    """``frame`` with a black caption strip below it (text drawn with Agg)."""
    h, w = frame.shape[:2]
    strip = 18
    fig = Figure(figsize=(w / 100, (h + strip) / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(np.concatenate([frame, np.zeros((strip, w, 3), np.uint8)]), interpolation="nearest")
    ax.text(4, h + strip - 5, text, color="white", fontsize=8, family="monospace")
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(out[: h + strip, :w])


def slice_frames(case: ViewCase, max_frames: int = 48, width: int = 256, caption: bool = True,
                 window: Sequence[float] = DISPLAY_WINDOW) -> list[np.ndarray]:
    """RGB frames through the axial slices (inferior to superior), at most ``max_frames``."""
    frames = []
    for z in frame_indices(case.shape[2], max_frames):
        f = axial_frame(case, z, width, window)
        frames.append(_caption(f, f"{case.name}  z {z + 1}/{case.shape[2]}") if caption else f)
    return frames


def write_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 8.0) -> Path:
    """Write ``frames`` (uint8 RGB arrays of one size) as a looping GIF."""
    import imageio.v3 as iio

    if not len(frames):
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=int(round(1000 / fps)), loop=0)
    return path


def slice_gif(case: ViewCase, path: str | Path, max_frames: int = 24, fps: float = 6.0, width: int = 224) -> Path:
    """An animated GIF through the axial slices with ground truth and prediction overlaid."""
    return write_gif(slice_frames(case, max_frames, width), path, fps)


def surface_mesh(mask: np.ndarray, spacing: Sequence[float], step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (mm) and triangles of the mask's surface (marching cubes on a lightly smoothed mask)."""
    from scipy import ndimage
    from skimage.measure import marching_cubes

    if not np.asarray(mask).any():
        raise ValueError("the mask is empty: there is no surface to draw")
    m = np.pad(np.asarray(mask, dtype=np.float32), 1)
    m = ndimage.gaussian_filter(m, sigma=0.8)
    level = min(0.5, 0.5 * float(m.max()))  # a one-voxel mask still has a surface after smoothing
    verts, faces, _n, _v = marching_cubes(m, level=level, spacing=tuple(float(s) for s in spacing), step_size=step)
    return verts - np.asarray(spacing, dtype=np.float64), faces


def surface_frames(mask: np.ndarray, spacing: Sequence[float], n_frames: int = 24, size_px: int = 320,
                   step: int | None = None, title: str = "", color=PRED_COLOR) -> list[np.ndarray]:
    """Frames of the mask's 3D surface turning once around the head-foot axis (LPS mm axes)."""
    from matplotlib.colors import LightSource
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if step is None:  # about 40k voxels per step^3 keeps the mesh light
        step = max(1, int(round((np.count_nonzero(mask) / 40000) ** (1 / 3))))
    verts, faces = surface_mesh(mask, spacing, step)
    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    mesh = Poly3DCollection(verts[faces], facecolors=color, linewidths=0, shade=True,
                            lightsource=LightSource(azdeg=225, altdeg=45))
    ax.add_collection3d(mesh)
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    center, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.05
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), center):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1))
    from matplotlib.ticker import MaxNLocator

    for axis, label in ((ax.xaxis, "left (mm)"), (ax.yaxis, "posterior (mm)"), (ax.zaxis, "superior (mm)")):
        axis.set_major_locator(MaxNLocator(3))
        axis.set_label_text(label, fontsize=7)
    ax.tick_params(labelsize=6, pad=0)
    if title:
        fig.suptitle(title, fontsize=8, y=0.98)
    frames = []
    for k in range(n_frames):
        ax.view_init(elev=15, azim=-60 + 360.0 * k / n_frames)
        canvas.draw()
        frames.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return frames


def surface_gif(mask: np.ndarray, spacing: Sequence[float], path: str | Path, n_frames: int = 20, fps: float = 8.0,
                size_px: int = 320, title: str = "") -> Path:
    """A rotating 3D surface of ``mask`` (marching cubes, matplotlib 3D) written as a GIF."""
    return write_gif(surface_frames(mask, spacing, n_frames, size_px, title=title), path, fps)


def gif_frame_count(path: str | Path) -> int:
    import imageio.v3 as iio

    return int(iio.imread(path, index=None, extension=".gif").shape[0])


def show_gif(path: str | Path):
    """An IPython object showing the GIF (``image/gif``; the static book keeps it animated)."""
    from IPython.display import Image

    return Image(data=Path(path).read_bytes(), format="gif")


def js_slider(case: ViewCase, max_frames: int = 24, width: int = 288, fps: float = 6.0) -> str:
    """A self-contained HTML/JavaScript slider through the axial slices (matplotlib ``to_jshtml``).

    It needs no kernel, so it works in the static book; frames are embedded as JPEG.
    """
    import matplotlib
    from matplotlib.animation import FuncAnimation

    frames = slice_frames(case, max_frames, width)
    h, w = frames[0].shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    im = ax.imshow(frames[0], interpolation="nearest")

    def update(i):
        im.set_data(frames[i])
        return (im,)

    anim = FuncAnimation(fig, update, frames=len(frames), interval=1000 / fps, blit=False)
    with matplotlib.rc_context({"animation.frame_format": "jpeg", "animation.embed_limit": 40}):
        html = anim.to_jshtml(fps=fps, default_mode="once")
    # open on the slice with the most spleen (not on an empty first slice), with a colour legend
    start = slider_start(case, max_frames)
    m = re.search(r"anim(\w+) = new Animation", html)
    if m and start:
        html += (f"<script>setTimeout(function() {{ if (typeof anim{m.group(1)} !== 'undefined') "
                 f"anim{m.group(1)}.set_frame({start}); }}, 50);</script>")
    return _html_legend(case) + html


def slider_start(case: ViewCase, max_frames: int = 24) -> int:
    """The frame (of :func:`frame_indices`) nearest the axial slice with the most spleen."""
    mask = case.label if case.label is not None else case.pred
    z = largest_slice(mask)
    idx = frame_indices(case.shape[2], max_frames)
    if z is None or not idx:
        return 0
    return int(np.argmin([abs(i - z) for i in idx]))


def _html_legend(case: ViewCase) -> str:
    def swatch(color, text):
        rgb = ",".join(str(int(round(c * 255))) for c in color[:3])
        return (f'<span style="display:inline-block;width:1.6em;height:0.25em;background:rgb({rgb});'
                f'vertical-align:middle;margin:0 0.3em 0 0.8em"></span>{text}')

    parts = []
    if case.label is not None:
        parts.append(swatch(GT_COLOR, "ground truth"))
    if case.pred is not None:
        parts.append(swatch(PRED_COLOR, "prediction"))
    return f'<p style="font-size:0.9em">{case.name}, axial slices:{"".join(parts)}</p>' if parts else ""


class SliceViewer:
    """An ipywidgets slice viewer; its plain-text form says what it is where widgets cannot run."""

    def __init__(self, widget, text: str):
        self.widget, self.text = widget, text

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/plain"] = self.text
        return bundle

    def __repr__(self) -> str:
        return self.text


def slice_viewer(case: ViewCase, width: int = 384) -> SliceViewer:
    """An interactive viewer (ipywidgets slider + image) for a running kernel.

    In the static book the widget cannot run; pair it with :func:`js_slider` or a GIF.
    """
    import imageio.v3 as iio
    import ipywidgets as widgets

    def png(z: int) -> bytes:
        return iio.imwrite("<bytes>", axial_frame(case, z, width), extension=".png")

    start = largest_slice(case.label if case.label is not None else case.pred)
    start = case.shape[2] // 2 if start is None else start
    slider = widgets.IntSlider(value=start, min=0, max=case.shape[2] - 1, description="axial slice",
                               continuous_update=True, layout=widgets.Layout(width=f"{width}px"))
    image = widgets.Image(value=png(start), format="png", width=width)

    def on_change(change):
        image.value = png(int(change["new"]))

    slider.observe(on_change, names="value")
    box = widgets.VBox([slider, image])
    return SliceViewer(box, f"interactive slice viewer for {case.name} (needs a running Jupyter kernel)")


# ---------------------------------------------------------------------------------------------
# benchmarks and tables


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
