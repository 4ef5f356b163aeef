"""Moving pictures: frames through the slices, GIFs, a rotating 3D surface, the JavaScript slider
that needs no kernel and the ipywidgets viewer that does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .view import DISPLAY_WINDOW, GT_COLOR, PRED_COLOR, ViewCase, _axial, largest_slice, window01


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
