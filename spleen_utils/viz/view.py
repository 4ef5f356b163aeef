"""Volumes for display: the case a figure draws, its LPS reorientation, the display window and
the drawing helpers every figure shares.

Display convention: volumes are reoriented to LPS before display, so an axial slice is shown the
radiological way (patient's left on the image's right, anterior at the top) whatever orientation
the file stores, and a coronal slice has the head at the top. Ground truth is drawn in green,
predictions in orange.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

#: abdominal soft-tissue display window (level 40 HU, width 400 HU)
DISPLAY_WINDOW = (-160.0, 240.0)
GT_COLOR = (0.20, 0.85, 0.30)  # green
PRED_COLOR = (1.00, 0.55, 0.00)  # orange


class SliceFigure(Figure):
    """A figure of CT slices: in a notebook it shows as a JPEG, every other figure as a PNG."""

    def __repr__(self) -> str:  # the text form stays a Figure's: "<Figure size 640x920 with 6 Axes>"
        return super().__repr__().replace(type(self).__name__, "Figure", 1)


def _register_inline_formatter() -> None:
    """Let a returned Figure show inline in a Jupyter kernel (pyplot is never imported here)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not hasattr(shell, "kernel"):
            return
        from IPython.core.pylabtools import print_figure, select_figure_formats

        select_figure_formats(shell, {"png"}, bbox_inches="tight", dpi=90)
        # a figure of CT slices shows as JPEG: noisy grey levels make PNGs several times larger
        formatters = shell.display_formatter.formatters
        formatters["image/png"].for_type(SliceFigure, lambda fig: None)
        formatters["image/jpeg"].for_type(SliceFigure, lambda fig: print_figure(
            fig, "jpeg", bbox_inches="tight", dpi=90, base64=True, pil_kwargs={"quality": 80}))
    except Exception:  # no IPython, or an IPython without these helpers: figures still save
        pass


_register_inline_formatter()


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
    from ..io import Volume, load_nifti

    if x is None or isinstance(x, Volume):
        return x
    return load_nifti(x, dtype=None)


def load_view(image, label=None, pred=None, name: str | None = None) -> ViewCase:
    """A :class:`ViewCase` from NIfTI paths (or :class:`~spleen_utils.io.Volume` objects).

    ``label`` and ``pred`` (paths, Volumes or arrays in the image's voxel order) must lie on the
    image's grid (a prediction from :class:`~spleen_utils.infer.Predictor` does).
    """
    from ..io import case_name

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
