"""The header step of a generated case: how it is sampled and how it is stored.

A case is built on an array in canonical RAS order with a diagonal affine (:class:`_Grid`); its
voxel size is drawn from the seed (or given), coarsened to keep a case below :data:`MAX_VOXELS`.
The voxels and the affine are then reoriented together (``nibabel.orientations``) to the case's
storage orientation, so the anatomy's world coordinates do not depend on how a file stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

#: storage orientations cycled with the case seed (MSD itself holds LAS and others; RAS is
#: NIfTI's canonical, LPS is DICOM's).
ORIENTATIONS = ("RAS", "LPS", "LAS")
INPLANE_SPACING_MM = (0.6, 1.0)
SLICE_SPACING_MM = (1.5, 5.0)
Z_EXTENT_MM = (120.0, 200.0)
#: spacing is coarsened (slices first, up to their range's end) to keep a case below this.
MAX_VOXELS = 16_000_000
#: an explicit ``spacing`` finer than this many voxels is refused (about 1.3 GB of float32 work)
LIMIT_VOXELS = 64_000_000


@dataclass
class Phantom:
    """One generated case with everything known about it."""

    image: np.ndarray  # int16 HU, in the storage orientation
    label: np.ndarray  # uint8 0/1 spleen
    affine: np.ndarray  # 4x4, voxel -> world RAS mm
    tissues: np.ndarray  # uint8 Tissue codes, same grid
    orientation: str
    spacing: tuple[float, float, float]  # mm along world x, y, z (the canonical RAS axes)
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def spleen_ml(self) -> float:
        return float(self.label.sum()) * float(np.prod(self.spacing)) / 1000.0


@dataclass
class Sampling:
    """A phantom's sampling draws: voxel size, field of view along z and the margins around the body.

    Always drawn (first, from the case's generator), so that an explicit spacing or orientation
    does not change the anatomy a seed gives.
    """

    inplane: float
    slice_mm: float
    z_extent: float
    margin_xy: float
    z_slack: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Sampling:
        u = rng.uniform
        inplane = float(u(*INPLANE_SPACING_MM))
        slice_mm = float(np.exp(u(np.log(SLICE_SPACING_MM[0]), np.log(SLICE_SPACING_MM[1]))))
        z_extent = float(u(*Z_EXTENT_MM))
        margin_xy = float(u(15, 35))
        z_slack = float(u(0, 1))
        return cls(inplane, slice_mm, z_extent, margin_xy, z_slack)


@dataclass
class _Grid:
    x: np.ndarray  # float32 world coordinates of voxel centres along the canonical axes
    y: np.ndarray
    z: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the world box [lo, hi]."""
        out = []
        for c, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0 = int(np.searchsorted(c, a, side="left"))
            i1 = int(np.searchsorted(c, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]


def _capped_spacing(inplane: float, slice_mm: float, fov_xy: float, z_extent: float, max_voxels: int) -> tuple[float, float, float]:
    """The drawn spacing, coarsened (slices first, then in-plane, within their ranges) to fit."""
    n_xy = (fov_xy / inplane) ** 2
    if n_xy * z_extent / slice_mm > max_voxels:
        slice_mm = min(SLICE_SPACING_MM[1], n_xy * z_extent / max_voxels)
    if n_xy * z_extent / slice_mm > max_voxels:
        inplane = min(INPLANE_SPACING_MM[1], float(fov_xy * np.sqrt(z_extent / (slice_mm * max_voxels))))
    return (float(inplane), float(inplane), float(slice_mm))


def sampling_grid(sampling: Sampling, half_body: float, z_lo: float, z_extent: float,
                  spacing: tuple[float, float, float] | None = None) -> _Grid:
    """The canonical RAS grid around a body of half size ``half_body`` mm and the slab [z_lo, z_lo + z_extent].

    ``spacing`` None: the drawn voxel size, coarsened to stay below :data:`MAX_VOXELS`.
    """
    if spacing is None:
        spacing_mm = _capped_spacing(sampling.inplane, sampling.slice_mm, 2.0 * (half_body + sampling.margin_xy),
                                     z_extent, MAX_VOXELS)
    else:
        spacing_mm = tuple(float(s) for s in spacing)
        if len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm):
            raise ValueError(f"spacing must be three positive sizes in mm, not {spacing!r}")
    half_fov = half_body + sampling.margin_xy
    axes_mm = []
    for lo, extent, sp in ((-half_fov, 2 * half_fov, spacing_mm[0]), (-half_fov, 2 * half_fov, spacing_mm[1]), (z_lo, z_extent, spacing_mm[2])):
        n = max(round(extent / sp), 8)
        start = lo + (extent - (n - 1) * sp) / 2.0  # centre the n samples in the extent
        axes_mm.append(start + sp * np.arange(n))
    n_voxels = int(np.prod([c.size for c in axes_mm], dtype=np.int64))
    if n_voxels > LIMIT_VOXELS:
        raise ValueError(f"spacing {spacing_mm} gives {n_voxels:,} voxels; use coarser spacing (at most {LIMIT_VOXELS:,})")
    return _Grid(*(c.astype(np.float32) for c in axes_mm), spacing=spacing_mm, origin=tuple(float(c[0]) for c in axes_mm))


def _reorient(arr: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine of a canonical RAS array, stored in orientation ``codes`` instead."""
    ornt = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.axcodes2ornt(tuple(codes)))
    out = np.ascontiguousarray(nio.apply_orientation(arr, ornt))
    return out, affine @ nio.inv_ornt_aff(ornt, arr.shape)


def _check_orientation(orientation: str) -> str:
    codes = str(orientation).upper()
    try:
        ornt = nio.axcodes2ornt(tuple(codes))
        valid = len(codes) == 3 and not np.isnan(ornt).any() and sorted(ornt[:, 0]) == [0, 1, 2]
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"orientation {orientation!r} is not a 3-letter axis code such as 'RAS', 'LPS' or 'LAS'")
    return codes


def case_orientation(seed: int, orientation: str | None = None) -> str:
    """The storage axis codes of case ``seed``: ``orientation`` (checked), else cycled with the seed."""
    return ORIENTATIONS[seed % len(ORIENTATIONS)] if orientation is None else _check_orientation(orientation)


def stored_case(image: np.ndarray, label: np.ndarray, tissues: np.ndarray, affine: np.ndarray, codes: str,
                spacing: tuple[float, float, float], seed: int, params: dict) -> Phantom:
    """The case of canonical RAS arrays on ``affine``, stored in orientation ``codes``."""
    img_o, aff_o = _reorient(image, affine, codes)
    lab_o, _ = _reorient(label, affine, codes)
    tis_o, _ = _reorient(tissues, affine, codes)
    return Phantom(img_o, lab_o, aff_o, tis_o, codes, spacing, seed, params)


def nifti_header() -> nib.Nifti1Header:
    """The header every file of a generated set is written with (mm, seconds)."""
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    return hdr  # qform/sform codes 0 here become 1 (scanner) in save_nifti
