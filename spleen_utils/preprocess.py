"""The fast array path of the preprocessing spec: the default path's executor, without torch or MONAI.

:mod:`spleen_utils.transforms` declares the spec (window the HU range to [0, 1], crop to the
body, orient to RAS, resample to the recipe's spacing) and its MONAI reference chain;
:func:`prepare` computes the same array on plain numpy arrays (``tests/test_infer.py`` holds the
two equal), and :func:`restore` takes values on the model's grid back onto the input's grid.
Why it is built this way (MONAI's geometry ported to numpy, separable linear resampling, the
foreground box found on raw HU) is told in :mod:`spleen_utils.infer`'s docstring, points 1 and 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError

if TYPE_CHECKING:  # annotations only: nibabel is imported where it is used
    from .io import Volume

#: the most voxels a volume may have on the recipe's grid (after cropping and resampling):
#: about 1 GiB as float32. A whole-body CT (50 x 50 x 200 cm) at the full recipe's 1.5 x 1.5 x
#: 2 mm is 1.1e8 voxels; 16^3 voxels of 400 mm would be 6e9 on the quick grid.
MAX_RESAMPLED_VOXELS = 1 << 28
#: the voxel sizes (mm) an input may have; beyond them the header is wrong, not the scanner
MIN_SPACING_MM, MAX_SPACING_MM = 1e-3, 100.0
#: relative tolerance for "this resampling matrix is diagonal"
_DIAG_TOL = 1e-6


@dataclass
class Prepared:
    """A volume on the model's grid and everything needed to go back to the input's grid."""

    image: np.ndarray  # (X, Y, Z) float32, windowed to [0, 1], RAS, recipe spacing
    affine: np.ndarray  # the model grid's affine
    in_shape: tuple[int, int, int]  # the input grid
    box: tuple[slice, slice, slice]  # the foreground box on the input grid
    ornt: np.ndarray  # nibabel orientation transform: cropped input -> RAS
    oriented_shape: tuple[int, int, int]
    scale: np.ndarray  # model voxel i sits at oriented voxel scale * i + offset (per axis)
    offset: np.ndarray


def foreground_box(array: np.ndarray, low: float) -> tuple[slice, slice, slice] | None:
    """The bounding box of the voxels above ``low`` (``CropForegroundd``'s on the windowed image)."""
    fg = array > low
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=others))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def window_hu(array: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """``ScaleIntensityRanged(a_min, a_max, 0, 1, clip=True)`` as one float32 pass (a new,
    C-contiguous array, also for a flipped or transposed view)."""
    lo, hi = (float(v) for v in hu_window)
    out = np.subtract(array, np.float32(lo), dtype=np.float32, order="C")
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def resample_linear(x: np.ndarray, positions: list[np.ndarray | None]) -> np.ndarray:
    """Separable linear interpolation of a 3-D array with border padding.

    ``positions[a]`` holds, for every output index along axis ``a``, the (fractional) input
    index it samples; ``None`` keeps that axis as it is. Trilinear interpolation is the product
    of three 1-D ones, so three passes give exactly what ``grid_sample`` (bilinear, border,
    voxel-index mapping) gives for a diagonal resampling matrix. The axis that shrinks the
    most goes first. Plain numpy: the ONNX path runs without torch.
    """
    x = np.asarray(x)
    order = sorted(
        (a for a in range(3) if positions[a] is not None),
        key=lambda a: len(positions[a]) / x.shape[a],  # type: ignore[arg-type]
    )
    for a in order:
        p = np.clip(np.asarray(positions[a], dtype=np.float64), 0, x.shape[a] - 1)
        i0 = np.floor(p).astype(np.intp)
        i1 = np.minimum(i0 + 1, x.shape[a] - 1)
        shape = [1, 1, 1]
        shape[a] = -1
        w = (p - i0).astype(x.dtype).reshape(shape)
        lo = np.take(x, i0, axis=a)
        hi = np.take(x, i1, axis=a)
        hi -= lo
        hi *= w
        lo += hi
        x = lo
    return x


def _positions(scale: np.ndarray, offset: np.ndarray, out_shape, in_shape) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for s, o, n_out, n_in in zip(scale, offset, out_shape, in_shape):
        if n_out == n_in and abs(s - 1.0) < 1e-9 and abs(o) < 1e-6:
            out.append(None)  # nothing to do on this axis
        else:
            out.append(np.arange(n_out, dtype=np.float64) * float(s) + float(o))
    return out


def _diagonal(xform: np.ndarray) -> bool:
    m = xform[:3, :3]
    off = m - np.diag(np.diag(m))
    return bool(np.all(np.abs(off) <= _DIAG_TOL * np.abs(np.diag(m)).max()) and np.all(np.diag(m) > 0))


def check_spacing(affine: np.ndarray, name: str = "image") -> tuple[float, float, float]:
    """The voxel size (mm per array axis) of ``affine``, refused when it is not finite, degenerate,
    or outside :data:`MIN_SPACING_MM` .. :data:`MAX_SPACING_MM`."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise DataError(f"{name}: the affine (voxel to world) is not a finite 4x4 matrix.")
    spacing = tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))
    text = "x".join(f"{v:.4g}" for v in spacing)
    if not all(MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in spacing):
        raise DataError(
            f"{name}: a voxel size of {text} mm is outside the {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm this "
            "program accepts; the header's geometry is wrong."
        )
    if abs(float(np.linalg.det(a[:3, :3]))) < 1e-9 * math.prod(spacing):
        raise DataError(f"{name}: the affine is degenerate (its voxel axes are not independent).")
    return spacing  # type: ignore[return-value]


def check_resampled_size(out_shape, recipe, name: str = "image") -> tuple[int, int, int]:
    """Refuse a grid on the recipe's spacing with more than :data:`MAX_RESAMPLED_VOXELS` voxels,
    before anything of that size is allocated; the one check every prediction path calls."""
    dims = [float(v) for v in out_shape]
    if len(dims) != 3 or not all(math.isfinite(v) and v >= 1 for v in dims):
        raise DataError(f"{name}: the image's grid on the model's spacing is not a valid size ({out_shape}).")
    voxels = math.prod(int(v) for v in dims)  # Python ints: no overflow
    if voxels > MAX_RESAMPLED_VOXELS:
        mm = "x".join(f"{float(v):g}" for v in recipe.pixdim)
        raise DataError(
            f"{name}: at the model's {mm} mm voxels the image would become {'x'.join(str(int(v)) for v in dims)} = "
            f"{voxels:,} voxels, more than the {MAX_RESAMPLED_VOXELS:,} this program accepts (check the header's voxel size)."
        )
    return tuple(int(v) for v in dims)  # type: ignore[return-value]


#: MONAI's ``monai.data.utils.AFFINE_TOL``
_AFFINE_TOL = 1e-3


def zoom_affine(affine: np.ndarray, scale) -> np.ndarray:
    """``monai.data.utils.zoom_affine(affine, scale, diagonal=False)`` in numpy (a test holds
    them equal): the affine's rotation with the voxel sizes ``scale`` (all positive), shear
    removed, no translation."""
    affine = np.array(affine, dtype=float, copy=True)
    d = len(affine) - 1
    scale_np = np.array(scale, dtype=float, copy=True)[:d]
    rzs = affine[:-1, :-1]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(len(affine))
    new[:-1, :-1] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(scale_np))
    return new


def compute_shape_offset(spatial_shape, in_affine: np.ndarray, out_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``monai.data.utils.compute_shape_offset(..., scale_extent=False)`` in numpy (a test holds
    them equal): the output grid's shape and the world position of its first voxel."""
    shape = np.array(tuple(spatial_shape), copy=True, dtype=float)
    in_a, out_a = np.asarray(in_affine, dtype=float), np.asarray(out_affine, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, dim - 1.0) for dim in shape], indexing="ij")).reshape((len(shape), -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(out_a, in_a) @ corners
    corners = in_a @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], 1), 0.0, rtol=_AFFINE_TOL):
            offset = corners[:-1, i]  # this corner is the smallest: it becomes the origin
            break
    if offset is None:  # else the output's centre on the input's centre
        offset = in_a[:-1, :-1] @ (shape / 2.0) + in_a[:-1, -1] - out_a[:-1, :-1] @ (out_shape / 2.0)
    return out_shape.astype(int, copy=False), offset


def _model_grid(shape, affine: np.ndarray, recipe):
    """Spacingd's output grid for an image of ``shape`` / ``affine`` (no voxel is touched):
    (orientation transform, oriented shape, oriented affine, new affine, output shape)."""
    import nibabel as nib

    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(recipe.orientation)
    ornt = nib.orientations.ornt_transform(src, dst)
    affine_o = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    oriented_shape = tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))
    new_affine = zoom_affine(affine_o, np.asarray(recipe.pixdim, dtype=np.float64))
    out_shape, offset = compute_shape_offset(oriented_shape, affine_o, new_affine)
    new_affine[:3, 3] = offset[:3]
    return ornt, oriented_shape, affine_o, new_affine, out_shape


def resampled_shape(vol: Volume, recipe, name: str = "image") -> tuple[int, int, int]:
    """The size of ``vol`` on the recipe's grid (without cropping: an upper bound), checked."""
    check_spacing(vol.affine, name)
    return check_resampled_size(_model_grid(vol.shape, vol.affine, recipe)[-1], recipe, name)


def prepare(vol: Volume, recipe) -> Prepared | None | str:
    """The default path's preprocessing of ``vol`` (see the module docstring).

    Returns a :class:`Prepared`, ``None`` when the image has no foreground (an empty mask), or
    ``"generic"`` when its affine needs MONAI's generic resampling (shear).
    """
    import nibabel as nib

    name = str(vol.path) if vol.path is not None else "image"
    check_spacing(vol.affine, name)  # before any geometry: finite, non-degenerate, plausible mm
    a = vol.array
    lo = float(recipe.hu_window[0])
    box = foreground_box(a, lo)
    if box is None:
        return None
    start = np.array([s.start for s in box], dtype=np.float64)
    crop_shape = tuple(s.stop - s.start for s in box)
    affine_c = vol.affine.copy()
    affine_c[:3, 3] = vol.affine[:3, :3] @ start + vol.affine[:3, 3]
    # orientation: as Orientationd (nibabel's closest axes), a flip / transpose;
    # spacing: Spacingd's output grid (zoom_affine + compute_shape_offset), its voxel mapping
    ornt, oriented_shape, affine_o, new_affine, out_shape = _model_grid(crop_shape, affine_c, recipe)
    out_shape = check_resampled_size(out_shape, recipe, name)  # before the resampled volume exists
    xform = np.linalg.solve(affine_o, new_affine)  # model voxel -> oriented voxel
    if not _diagonal(xform):
        return "generic"
    scale, shift = np.diag(xform)[:3].copy(), xform[:3, 3].copy()
    # reorient the box as a view (flips / transposes), then window it into one new array: one
    # pass over the voxels instead of two (a fresh 100+ MB array costs its page faults too)
    oriented = window_hu(nib.orientations.apply_orientation(a[box], ornt), recipe.hu_window)
    assert oriented.shape == oriented_shape
    out_shape = tuple(int(v) for v in out_shape)
    x = resample_linear(oriented, _positions(scale, shift, out_shape, oriented_shape))
    return Prepared(
        image=np.ascontiguousarray(x),
        affine=new_affine,
        in_shape=vol.shape,
        box=box,
        ornt=ornt,
        oriented_shape=oriented_shape,
        scale=scale,
        offset=shift,
    )


def restore(values: np.ndarray, prep: Prepared) -> tuple[slice, slice, slice, np.ndarray]:
    """Resample ``values`` ``(X, Y, Z)`` on the model grid back onto the input's foreground box.

    Returns the box and the values on it (in the input's axis order); outside the box the
    preprocessing had cropped the image away.
    """
    import nibabel as nib

    inv_scale = 1.0 / prep.scale
    inv_shift = -prep.offset / prep.scale  # oriented voxel j sits at model voxel (j - offset) / scale
    v = resample_linear(np.asarray(values), _positions(inv_scale, inv_shift, prep.oriented_shape, tuple(values.shape)))
    # undo the orientation: apply the inverse flip / transpose
    arr = nib.orientations.apply_orientation(v, _inverse_ornt(prep.ornt))  # a view: the caller thresholds it
    return (*prep.box, arr)  # type: ignore[return-value]


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform that undoes ``ornt``."""
    inv = np.zeros_like(ornt)
    for i, (ax, flip) in enumerate(ornt):
        inv[int(ax)] = (i, flip)
    return inv


