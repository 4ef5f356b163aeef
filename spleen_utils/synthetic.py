"""Synthetic CT-like abdominal phantoms, written as a dataset in the exact MSD Task09 Spleen layout.

This is the data of the ``quick`` profile: a set that a residual 3D UNet learns on a laptop CPU in
minutes, yet one that cannot be solved by a threshold. Each case is an upper-abdominal CT slab:

* air outside a body outline (a super-ellipse, 280-330 mm wide, 200-240 mm deep) with a
  subcutaneous fat layer, a muscle wall (thick paraspinal muscles at the back) and an abdominal
  cavity filled with a blobby mix of bowel (with some gas) and fat;
* the liver (patient's right, anterior, superior, with a left lobe across the midline), the
  stomach (air over fluid, supine), both kidneys (posterior, lower, cortex and medulla, perirenal
  fat), aorta and inferior vena cava, a segmented vertebral column (cortex, cancellous bone, discs,
  spinal canal, posterior arch) and ribs (arcs in the body wall, falling towards the front);
  the lung bases and the heart above the two domes of the diaphragm;
* the spleen on the patient's LEFT, POSTERIOR and SUPERIOR, against the body wall under the
  ribs: a rotated, lobulated ellipsoid (radius perturbed by low-frequency harmonics) with a medial
  hilum notch, 100-350 mL.

Spleen and liver enhance alike (portal-venous phase as in MSD: a shared 95-135 HU level, each
within +-6 HU of it, so 89-141 HU and at most 12 HU apart in a case), so location and shape, not
intensity, identify the spleen. Gaussian noise
(sigma 10-25 HU) and low-frequency texture are added; the image is int16 HU, the label uint8 0/1.

Anatomy is built in patient coordinates (mm, RAS+: +x towards the patient's right, so the patient's
left has negative x; +y anterior; +z superior) on an array in canonical RAS order with a diagonal
affine; the voxels and the affine are then reoriented together (``nibabel.orientations``) to the
case's storage orientation (RAS, LPS or LAS), so the anatomy's world coordinates do not depend on
how a file stores it. Geometry varies per case: in-plane spacing 0.6-1.0 mm, slices 1.5-5 mm,
a field of view of 120-200 mm along z around the spleen.

Everything is deterministic per seed (one :class:`numpy.random.Generator` per case).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from . import appearance as ap
from .errors import DataError
from .io import save_nifti
from .progress import report

#: recorded in dataset.json; bump VERSION whenever the phantoms a seed gives change.
GENERATOR = "spleen_utils.synthetic"
VERSION = 4  # 3: tissue maps, label-map cases, validation folds; 4: thicker voxels, thick-slice look

#: storage orientations cycled with the case seed (MSD itself holds LAS and others; RAS is
#: NIfTI's canonical, LPS is DICOM's).
ORIENTATIONS = ("RAS", "LPS", "LAS")
INPLANE_SPACING_MM = (0.6, 1.0)
SLICE_SPACING_MM = (1.5, 5.0)
Z_EXTENT_MM = (120.0, 200.0)
#: the spleen of every case lies in this range (its voxel volume, checked while building).
SPLEEN_VOLUME_ML = (100.0, 350.0)
#: spacing is coarsened (slices first, up to their range's end) to keep a case below this.
MAX_VOXELS = 16_000_000
#: an explicit ``spacing`` finer than this many voxels is refused (about 1.3 GB of float32 work)
LIMIT_VOXELS = 64_000_000
HU_RANGE = (-1024, 3071)
#: cases per dataset seed: case ``i`` of dataset ``seed`` is phantom ``seed * 1000 + i``.
CASES_PER_SEED = 1000


class Tissue(IntEnum):
    """The tissue classes a phantom is painted with (``Phantom.tissues`` holds them).

    The codes are :mod:`spleen_utils.appearance`'s, which paints them; the last six are used by
    the anatomy taken from real label maps (:mod:`spleen_utils.labelmaps`), not by the phantoms.
    """

    AIR = ap.AIR
    FAT = ap.FAT
    MUSCLE = ap.MUSCLE
    BOWEL = ap.BOWEL
    GAS = ap.GAS
    LUNG = ap.LUNG
    HEART = ap.HEART
    LIVER = ap.LIVER
    GALLBLADDER = ap.GALLBLADDER
    STOMACH_WALL = ap.STOMACH_WALL
    STOMACH_CONTENT = ap.STOMACH_CONTENT
    KIDNEY_CORTEX = ap.KIDNEY_CORTEX
    KIDNEY_MEDULLA = ap.KIDNEY_MEDULLA
    AORTA = ap.AORTA
    IVC = ap.IVC
    SPLEEN = ap.SPLEEN
    BONE_CANCELLOUS = ap.BONE_CANCELLOUS
    BONE_CORTEX = ap.BONE_CORTEX
    DISC = ap.DISC
    SPINAL_CANAL = ap.SPINAL_CANAL
    RIB_CORTEX = ap.RIB_CORTEX
    RIB_MARROW = ap.RIB_MARROW
    PANCREAS = ap.PANCREAS
    SOFT = ap.SOFT
    BLADDER = ap.BLADDER
    COLON = ap.COLON
    PORTAL_VEIN = ap.PORTAL_VEIN


_N_TISSUES = len(Tissue)


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


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case ``index`` (1-based, ``spleen_<index>``) of dataset ``seed``."""
    return int(seed) * CASES_PER_SEED + int(index)


# --------------------------------------------------------------------------------------------
# geometry helpers


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


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass
class _Ellipsoid:
    """A (possibly lobulated) ellipsoid: ``axes`` columns are its unit axes in world coordinates."""

    center: np.ndarray
    semi: np.ndarray
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))
    # lobulation: radius *= 1 + sum_k amp_k sin(freq_k . u + phase_k) (u: unit-sphere coordinates)
    lobes: list = field(default_factory=list)

    def scaled(self, k: float) -> _Ellipsoid:
        return _Ellipsoid(self.center, self.semi * k, self.axes, self.lobes)

    def half_extent(self) -> np.ndarray:
        bulge = 1.0 + sum(abs(a) for a, _, _ in self.lobes)
        return np.sqrt(((self.axes * self.semi[None, :]) ** 2).sum(axis=1)) * bulge

    def box(self, grid: _Grid):
        h = self.half_extent()
        return grid.box(self.center - h, self.center + h)

    def local(self, grid: _Grid, box) -> list[np.ndarray]:
        """The three local coordinates (unit sphere = surface) on the voxels of ``box``."""
        d = [(c[s] - float(m)).astype(np.float32) for c, s, m in zip((grid.x, grid.y, grid.z), box, self.center)]
        out = []
        for i in range(3):
            w = self.axes[:, i] / self.semi[i]
            out.append(
                (np.float32(w[0]) * d[0])[:, None, None]
                + (np.float32(w[1]) * d[1])[None, :, None]
                + (np.float32(w[2]) * d[2])[None, None, :]
            )
        return out

    def inside(self, grid: _Grid, box, u: list[np.ndarray] | None = None) -> np.ndarray:
        u = self.local(grid, box) if u is None else u
        rho2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
        if not self.lobes:
            return rho2 < 1.0
        radius = np.ones_like(rho2)
        for amp, freq, phase in self.lobes:
            radius += np.float32(amp) * np.sin(
                np.float32(freq[0]) * u[0] + np.float32(freq[1]) * u[1] + np.float32(freq[2]) * u[2] + np.float32(phase)
            )
        return rho2 < radius * radius


def _lobes(rng: np.random.Generator, n: int, amp: tuple[float, float], freq: tuple[float, float]) -> list:
    out = []
    for _ in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        out.append((float(rng.uniform(*amp)), direction * rng.uniform(*freq), float(rng.uniform(0, 2 * np.pi))))
    return out


def _smooth_field(rng: np.random.Generator, grid: _Grid, cell_mm: float) -> np.ndarray:
    """A smooth random field (about unit variance, correlation length ~``2 * cell_mm``), float32.

    Gaussian-smoothed white noise on a coarse grid, linearly interpolated up to ``grid``
    (deterministic: no BLAS, only gathers and multiply-adds).
    """
    coords = (grid.x, grid.y, grid.z)
    counts = [int(np.ceil((c[-1] - c[0]) / cell_mm)) + 2 if c.size > 1 else 2 for c in coords]
    coarse = rng.standard_normal(counts).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=1.0, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    out = coarse
    for axis in (2, 1, 0):  # the largest expansion (x) last: gathers along axis 0 copy rows
        c = coords[axis]
        t = ((c - c[0]) / cell_mm).astype(np.float32)
        i0 = np.floor(t).astype(np.intp)
        w = t - i0
        shape = [1, 1, 1]
        shape[axis] = -1
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out.astype(np.float32, copy=False)


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


# --------------------------------------------------------------------------------------------
# the phantom


def _capped_spacing(inplane: float, slice_mm: float, fov_xy: float, z_extent: float, max_voxels: int) -> tuple[float, float, float]:
    """The drawn spacing, coarsened (slices first, then in-plane, within their ranges) to fit."""
    n_xy = (fov_xy / inplane) ** 2
    if n_xy * z_extent / slice_mm > max_voxels:
        slice_mm = min(SLICE_SPACING_MM[1], n_xy * z_extent / max_voxels)
    if n_xy * z_extent / slice_mm > max_voxels:
        inplane = min(INPLANE_SPACING_MM[1], float(fov_xy * np.sqrt(z_extent / (slice_mm * max_voxels))))
    return (float(inplane), float(inplane), float(slice_mm))


def _draw_hu(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-case mean HU and texture amplitude of every tissue, and the noise sigma."""
    u = rng.uniform
    hu = np.zeros(_N_TISSUES, np.float32)
    tex = np.zeros(_N_TISSUES, np.float32)
    enhanced = u(95, 135)  # liver and spleen enhance alike in the portal-venous phase
    cortex = u(150, 200)
    values = {
        Tissue.AIR: (-1000.0, 0.0),
        Tissue.FAT: (u(-115, -85), 8.0),
        Tissue.MUSCLE: (u(40, 60), 5.0),
        Tissue.BOWEL: (u(20, 50), 14.0),
        Tissue.GAS: (u(-1000, -900), 20.0),
        Tissue.LUNG: (u(-880, -820), 25.0),
        Tissue.HEART: (u(40, 60), 5.0),
        Tissue.LIVER: (enhanced + u(-6, 6), u(4, 8)),
        Tissue.GALLBLADDER: (u(0, 20), 2.0),
        Tissue.STOMACH_WALL: (u(40, 60), 4.0),
        Tissue.STOMACH_CONTENT: (u(5, 25), 6.0),
        Tissue.KIDNEY_CORTEX: (cortex, 6.0),
        Tissue.KIDNEY_MEDULLA: (cortex - u(40, 70), 6.0),
        Tissue.AORTA: (u(140, 220), 3.0),
        Tissue.IVC: (u(100, 150), 3.0),
        Tissue.SPLEEN: (enhanced + u(-6, 6), u(4, 8)),
        Tissue.BONE_CANCELLOUS: (u(150, 280), 25.0),
        Tissue.BONE_CORTEX: (u(500, 900), 40.0),
        Tissue.DISC: (u(70, 100), 5.0),
        Tissue.SPINAL_CANAL: (u(10, 30), 3.0),
        Tissue.RIB_CORTEX: (u(400, 1000), 40.0),
        Tissue.RIB_MARROW: (u(150, 250), 20.0),
    }
    for t, (m, a) in values.items():
        hu[t], tex[t] = m, a
    return hu, tex, float(u(10, 25))


def generate_case(
    seed: int,
    orientation: str | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> Phantom:
    """One phantom with its tissue map and parameters (``make_phantom`` returns the files' part).

    ``orientation``: storage axis codes (default: ``ORIENTATIONS[seed % 3]``, so consecutive
    seeds cycle through RAS, LPS and LAS). ``spacing``: voxel size in mm along world x, y, z
    (default: drawn from the seed, in-plane 0.6-1.0 mm, slices 1.5-5 mm). Neither changes the
    anatomy a seed gives, only how it is sampled and stored.
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    rng = np.random.default_rng(seed)
    u = rng.uniform

    # ---- geometry draws (always drawn, so that overrides do not change the anatomy)
    inplane = float(u(*INPLANE_SPACING_MM))
    slice_mm = float(np.exp(u(np.log(SLICE_SPACING_MM[0]), np.log(SLICE_SPACING_MM[1]))))
    z_extent = float(u(*Z_EXTENT_MM))
    margin_xy = float(u(15, 35))
    z_slack = float(u(0, 1))
    codes = ORIENTATIONS[seed % len(ORIENTATIONS)] if orientation is None else _check_orientation(orientation)

    # ---- body
    a = float(u(140, 165))  # half width (mm)
    b = float(u(100, 120))  # half depth
    bx, by = float(u(-5, 5)), float(u(-5, 5))  # body centre (the scanner's isocentre is 0, 0)
    p_super = float(u(2.0, 2.6))
    outline = [(k, float(u(0.005, 0.02)), float(u(0, 2 * np.pi))) for k in (2, 3, 4)]
    fat_base = float(u(10, 28))
    fat_ant = float(u(0.2, 0.8))
    mus_base = float(u(8, 13))
    paraspinal = float(u(30, 40))
    ac, bc = a - fat_base - mus_base, b - fat_base - mus_base  # approximate cavity half axes

    # ---- spleen: against the left posterolateral wall, thin axis along the wall normal
    zsp = float(u(-150, 150))  # world z of the spleen's centre (table position)
    volume_ml = float(u(120, 320))
    rw, rt = float(u(0.6, 0.8)), float(u(0.35, 0.45))
    theta_s = float(np.deg2rad(u(198, 220)))  # angle around the body centre: left (x<0), posterior (y<0)
    tilt = float(u(15, 40))
    gap = float(u(3, 8))
    hilum_depth = float(u(0.9, 1.2))
    spleen_lobes = _lobes(rng, 4, (0.03, 0.07), (2.0, 4.0))

    def r_body(th):
        c, s = np.abs(np.cos(th)), np.abs(np.sin(th))
        r = (c**p_super / a**p_super + s**p_super / b**p_super) ** (-1.0 / p_super)
        for k, amp, ph in outline:
            r = r * (1.0 + amp * np.cos(k * th + ph))
        return r

    def t_fat(th):
        return fat_base * (1.0 + fat_ant * np.maximum(np.sin(th), 0.0))

    def phi_post(th):  # angular distance from the posterior midline, 0..pi
        return np.abs(np.angle(np.exp(1j * (th + np.pi / 2))))

    def t_mus(th):
        return mus_base + paraspinal * np.exp(-((phi_post(th) / 0.38) ** 2))

    def r_cav(th):
        return r_body(th) - t_fat(th) - t_mus(th)

    def wall_point(t: float) -> np.ndarray:
        return np.array([bx, by, 0.0]) + float(r_cav(t)) * np.array([np.cos(t), np.sin(t), 0.0])

    tangent = wall_point(theta_s + 1e-3) - wall_point(theta_s - 1e-3)
    tangent /= np.linalg.norm(tangent)
    normal = np.array([tangent[1], -tangent[0], 0.0])  # outward (the curve runs anticlockwise)
    if tangent[1] > 0:  # the superior end of the long axis leans posterior
        tangent = -tangent
    e_long = np.cos(np.deg2rad(tilt)) * np.array([0.0, 0.0, 1.0]) + np.sin(np.deg2rad(tilt)) * tangent
    e_wide = np.cross(normal, e_long)
    spleen_axes = np.stack([e_long, e_wide, normal], axis=1)
    ratios = np.array([1.0, rw, rt])
    length = (3.0 * volume_ml * 1000.0 * 1.1 / (4.0 * np.pi * rw * rt)) ** (1.0 / 3.0)

    def spleen_shape(scale: float) -> tuple[_Ellipsoid, _Ellipsoid]:
        semi = ratios * length * scale
        wall = wall_point(theta_s)
        center = wall - normal * (semi[2] * 1.15 + gap)
        center[2] = zsp
        body = _Ellipsoid(center, semi, spleen_axes, spleen_lobes)
        notch = _Ellipsoid(center - normal * semi[2] * hilum_depth * 1.0, semi * np.array([0.5, 0.45, 0.55]), spleen_axes)
        return body, notch

    spleen0, _ = spleen_shape(1.0)
    sp_half = spleen0.half_extent()
    # field of view along z: the spleen (room for a 10% larger one) and at least 10 mm either side
    lobe_sum = sum(abs(amp) for amp, _, _ in spleen_lobes)
    span = 2.0 * float(_Ellipsoid(spleen0.center, spleen0.semi, spleen_axes).half_extent()[2]) * 1.1 * (1 + lobe_sum / 2)
    z_extent = min(max(z_extent, span + 20.0), Z_EXTENT_MM[1])
    z_lo = zsp - span / 2 - 10.0 - z_slack * max(z_extent - span - 20.0, 0.0)

    # ---- other organs (all relative to the body and the spleen)
    y_vb = by - b + fat_base * 0.5 + float(u(55, 65))  # vertebral body centre
    vb_semi = (float(u(18, 23)), float(u(15, 19)))
    apex_l = np.array([spleen0.center[0] + 20.0, spleen0.center[1] + 10.0, zsp + sp_half[2] + float(u(2, 10))])
    apex_r = np.array([bx + 0.45 * ac, by, apex_l[2] + float(u(5, 20))])
    curv_l, curv_r = float(u(0.0015, 0.003)), float(u(0.0015, 0.003))
    diaphragm = float(u(3, 6))
    heart = (bx - float(u(0, 20)), by + float(u(0.15, 0.35)) * bc, float(u(55, 75)), float(u(45, 60)))

    liver_r = _Ellipsoid(
        np.array([bx + u(0.4, 0.5) * ac, by + u(-0.05, 0.15) * bc, zsp + u(5, 25)]),
        np.array([u(0.55, 0.7) * ac, u(0.7, 0.85) * bc, u(70, 95)]),
        _rot_z(u(-10, 10)),
        _lobes(rng, 3, (0.02, 0.04), (1.5, 3.0)),
    )
    liver_l = _Ellipsoid(
        np.array([bx - u(0.05, 0.25) * ac, by + u(0.35, 0.5) * bc, zsp + u(25, 45)]),
        np.array([u(45, 70), u(20, 30), u(35, 50)]),
        _rot_z(u(-15, 15)),
    )
    has_gb = bool(u() < 0.5)
    gallbladder = _Ellipsoid(
        np.array([bx + u(0.1, 0.3) * ac, by + u(0.25, 0.45) * bc, liver_r.center[2] - u(30, 50)]),
        np.array([u(12, 18), u(12, 18), u(25, 40)]),
        _rot_y(u(-20, 20)),
    )
    has_stomach = bool(u() < 0.75)
    stomach = _Ellipsoid(
        np.array([spleen0.center[0] + u(40, 65), by + u(0.1, 0.35) * bc, zsp + u(0, 30)]),
        np.array([u(35, 55), u(25, 40), u(40, 60)]),
        _rot_z(u(-30, 30)) @ _rot_y(u(-20, 20)),
        _lobes(rng, 2, (0.02, 0.05), (1.5, 3.0)),
    )
    stomach_level = float(u(-0.2, 0.6))
    kidney_z = zsp - float(u(35, 55))
    kidneys = []
    for side, dz in ((-1.0, 0.0), (1.0, -float(u(5, 20)))):
        kidneys.append(
            _Ellipsoid(
                np.array([bx + side * u(55, 75), y_vb + u(0, 15), kidney_z + dz]),
                np.array([u(22, 28), u(19, 24), u(45, 58)]),
                _rot_z(-side * u(20, 35)) @ _rot_y(side * u(8, 18)),
                _lobes(rng, 2, (0.02, 0.04), (1.5, 3.0)),
            )
        )
    medulla = float(u(0.6, 0.72))
    aorta = (bx - float(u(5, 20)), y_vb + vb_semi[1] + float(u(11, 16)), float(u(9, 13)))
    ivc = (bx + float(u(20, 30)), y_vb + vb_semi[1] + float(u(8, 15)), float(u(10, 15)), float(u(7, 11)))
    canal = (y_vb - vb_semi[1] - float(u(8, 11)), float(u(9, 12)), float(u(7, 9)))
    spinous = float(u(18, 28))
    transverse = float(u(25, 35))
    disc_period, disc_t, disc_phase = float(u(26, 32)), float(u(6, 9)), float(u(0, 32))
    rib_gap = float(u(5, 8))
    rib_drop = float(u(70, 110))
    rib_pitch = float(u(24, 30))
    rib_lowest = zsp - float(u(25, 45))
    rib_half = (float(u(4, 5.5)), float(u(5, 7)))  # radial, vertical half thickness
    bowel_thr = float(u(-0.2, 0.3))
    gas_thr = bowel_thr + float(u(1.6, 2.4))
    hu, tex_amp, noise_sigma = _draw_hu(rng)

    # ---- sampling grid (canonical RAS)
    if spacing is None:
        spacing_mm = _capped_spacing(inplane, slice_mm, 2.0 * (max(a, b) + margin_xy), z_extent, MAX_VOXELS)
    else:
        spacing_mm = tuple(float(s) for s in spacing)
        if len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm):
            raise ValueError(f"spacing must be three positive sizes in mm, not {spacing!r}")
    half_fov = max(a, b) + margin_xy
    axes_mm = []
    for lo, extent, sp in ((-half_fov, 2 * half_fov, spacing_mm[0]), (-half_fov, 2 * half_fov, spacing_mm[1]), (z_lo, z_extent, spacing_mm[2])):
        n = max(round(extent / sp), 8)
        start = lo + (extent - (n - 1) * sp) / 2.0  # centre the n samples in the extent
        axes_mm.append(start + sp * np.arange(n))
    n_voxels = int(np.prod([c.size for c in axes_mm], dtype=np.int64))
    if n_voxels > LIMIT_VOXELS:
        raise ValueError(f"spacing {spacing_mm} gives {n_voxels:,} voxels; use coarser spacing (at most {LIMIT_VOXELS:,})")
    grid = _Grid(*(c.astype(np.float32) for c in axes_mm), spacing=spacing_mm, origin=tuple(float(c[0]) for c in axes_mm))
    nx, ny, nz = grid.shape

    # ---- 2D body layers
    X = grid.x[:, None] - np.float32(bx)
    Y = grid.y[None, :] - np.float32(by)
    r = np.hypot(X, Y)
    th = np.arctan2(Y, X)
    rb = r_body(th).astype(np.float32)
    rm = (rb - t_fat(th)).astype(np.float32)
    rc = (rm - t_mus(th)).astype(np.float32)
    layers = np.full((nx, ny), Tissue.AIR, np.uint8)
    layers[r < rb] = Tissue.FAT
    layers[r < rm] = Tissue.MUSCLE
    cavity = r < rc

    # ---- 3D: the cavity's bowel / fat mix, the wall layers elsewhere
    mix = _smooth_field(rng, grid, float(u(5, 8)))
    inner = np.where(mix > bowel_thr, np.uint8(Tissue.BOWEL), np.uint8(Tissue.FAT))
    inner[mix > gas_thr] = Tissue.GAS
    del mix
    tissues = np.where(cavity[:, :, None], inner, layers[:, :, None])
    del inner

    # ---- diaphragm, lung bases, heart
    Xw = grid.x[:, None].astype(np.float64)
    Yw = grid.y[None, :].astype(np.float64)
    dome = np.maximum(
        apex_l[2] - curv_l * ((Xw - apex_l[0]) ** 2 + (Yw - apex_l[1]) ** 2),
        apex_r[2] - curv_r * ((Xw - apex_r[0]) ** 2 + (Yw - apex_r[1]) ** 2),
    ).astype(np.float32)
    organ_top = dome - np.float32(diaphragm)  # abdominal organs stay below the diaphragm
    k0 = int(np.searchsorted(grid.z, float(organ_top[cavity].min()) if cavity.any() else np.inf))
    if k0 < nz:
        zz = grid.z[None, None, k0:]
        above = cavity[:, :, None] & (zz > dome[:, :, None])
        band = cavity[:, :, None] & (zz > organ_top[:, :, None]) & ~above
        heart2d = ((X - (heart[0] - bx)) / heart[2]) ** 2 + ((Y - (heart[1] - by)) / heart[3]) ** 2 < 1.0
        sub = tissues[:, :, k0:]
        sub[band] = Tissue.MUSCLE
        sub[above & heart2d[:, :, None]] = Tissue.HEART
        sub[above & ~heart2d[:, :, None]] = Tissue.LUNG
        del above, band

    # 2D footprints of the structures that run through the whole slab: vertebral column, vessels
    zdisc = np.mod(grid.z - np.float32(disc_phase), np.float32(disc_period)) < disc_t
    vb = ((X) / vb_semi[0]) ** 2 + ((Y - (y_vb - by)) / vb_semi[1]) ** 2
    vb_in, vb_core = vb < 1.0, vb < 0.72
    cy_rel = canal[0] - by
    can = (X / canal[1]) ** 2 + ((Y - cy_rel) / canal[2]) ** 2
    arch = (X / (canal[1] + 6.0)) ** 2 + ((Y - cy_rel) / (canal[2] + 6.0)) ** 2 < 1.0
    arch |= (np.abs(X) < 3.5) & (Y < cy_rel) & (Y > cy_rel - canal[2] - spinous)
    arch |= (np.abs(Y - cy_rel) < 3.0) & (np.abs(X) < transverse)
    arch &= ~(can < 1.0) & (r < rb)
    ao2d = (X - (aorta[0] - bx)) ** 2 + (Y - (aorta[1] - by)) ** 2 < aorta[2] ** 2
    ivc2d = ((X - (ivc[0] - bx)) / ivc[2]) ** 2 + ((Y - (ivc[1] - by)) / ivc[3]) ** 2 < 1.0
    # organs keep a fat plane of ~3 mm from the spine and the aorta (the IVC runs through the liver)
    keepout = ndimage.distance_transform_edt(~(vb_in | arch | (can < 1.0) | ao2d), sampling=spacing_mm[:2]) < 3.0
    abdomen = cavity & ~keepout

    def allowed(box) -> np.ndarray:
        """Inside the abdominal cavity, below the diaphragm and clear of spine and vessels, on ``box``."""
        return abdomen[box[0], box[1]][:, :, None] & (grid.z[box[2]][None, None, :] < organ_top[box[0], box[1]][:, :, None])

    def paint(shape: _Ellipsoid, tissue: int, clip: bool = True) -> None:
        box = shape.box(grid)
        if box is None:
            return
        m = shape.inside(grid, box)
        if clip:
            m &= allowed(box)
        tissues[box][m] = tissue

    # ---- organs, back to front: later ones win where they meet
    paint(liver_r, Tissue.LIVER)
    paint(liver_l, Tissue.LIVER)
    if has_gb:
        paint(gallbladder, Tissue.GALLBLADDER)
    if has_stomach:
        box = stomach.box(grid)
        if box is not None:
            uu = stomach.local(grid, box)
            outer = stomach.inside(grid, box, uu) & allowed(box)
            inner_m = stomach.scaled(1.0 - 5.0 / float(stomach.semi.min())).inside(grid, box) & outer
            level = np.float32(stomach.center[1] + stomach_level * stomach.semi[1])
            gas = inner_m & (grid.y[box[1]][None, :, None] > level)
            view = tissues[box]
            view[outer] = Tissue.STOMACH_WALL
            view[inner_m] = Tissue.STOMACH_CONTENT
            view[gas] = Tissue.GAS
    for kid in kidneys:
        paint(kid.scaled(1.3), Tissue.FAT)  # perirenal fat
        box = kid.box(grid)
        if box is not None:
            uu = kid.local(grid, box)
            m = kid.inside(grid, box, uu) & allowed(box)
            rho2 = uu[0] ** 2 + uu[1] ** 2 + uu[2] ** 2
            view = tissues[box]
            view[m] = Tissue.KIDNEY_CORTEX
            view[m & (rho2 < medulla**2)] = Tissue.KIDNEY_MEDULLA

    # spleen: rescaled until its voxel volume lies in the stated range
    lo_ml, hi_ml = SPLEEN_VOLUME_ML[0] * 1.05, SPLEEN_VOLUME_ML[1] * 0.95
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    scale = 1.0
    for _ in range(6):
        body_s, notch = spleen_shape(scale)
        box = body_s.box(grid)
        if box is None:
            raise DataError(f"phantom {seed}: the spleen lies outside the field of view")
        m = body_s.inside(grid, box) & ~notch.inside(grid, box) & allowed(box)
        ml = float(m.sum()) * voxel_ml
        if lo_ml <= ml <= hi_ml:
            break
        target = min(max(volume_ml, lo_ml * 1.05), hi_ml * 0.95)
        scale *= (target / max(ml, 1e-3)) ** (1.0 / 3.0)
    tissues[box][m] = Tissue.SPLEEN

    # vessels: cylinders along z through the whole slab (they cross the diaphragm)
    tissues[ivc2d] = Tissue.IVC
    tissues[ao2d] = Tissue.AORTA
    # vertebral column: body (cortex, cancellous, discs), canal, posterior arch, processes
    body_col = np.where(zdisc, np.uint8(Tissue.DISC), np.uint8(Tissue.BONE_CORTEX))
    core_col = np.where(zdisc, np.uint8(Tissue.DISC), np.uint8(Tissue.BONE_CANCELLOUS))
    tissues[arch] = Tissue.BONE_CORTEX
    ix, iy = np.nonzero(vb_in & ~vb_core)
    tissues[ix, iy, :] = body_col[None, :]
    ix, iy = np.nonzero(vb_core)
    tissues[ix, iy, :] = core_col[None, :]
    tissues[can < 1.0] = Tissue.SPINAL_CANAL

    # ribs: arcs just outside the cavity, falling from back to front, both sides
    phi = phi_post(th)
    r_rib = rc + np.float32(rib_gap)
    radial = (r - r_rib) / np.float32(rib_half[0])
    ring = (np.abs(radial) < 1.0) & (phi > np.deg2rad(18)) & (phi < np.deg2rad(145)) & (r < rb)
    rx, ry = np.nonzero(ring)
    if rx.size:
        phi_p = phi[rx, ry].astype(np.float32)
        half_h = np.float32(rib_half[1]) * np.sqrt(np.maximum(0.0, 1.0 - radial[rx, ry] ** 2)).astype(np.float32)
        z_top = float(grid.z[-1])
        k = 0
        while True:
            z0 = rib_lowest + k * rib_pitch
            zc = np.float32(z0) - np.float32(rib_drop) * (phi_p / np.float32(np.pi)) ** 1.2
            if float(zc.min()) - rib_half[1] > z_top:
                break
            reach = np.deg2rad(80 + 25 * min(k, 3))  # the lowest ribs are short (floating ribs)
            sel = phi_p < reach
            kz = grid.box((-np.inf, -np.inf, float(zc.min()) - rib_half[1]), (np.inf, np.inf, float(zc.max()) + rib_half[1]))
            if kz is not None and sel.any():
                zz = grid.z[kz[2]][None, :]
                d = np.abs(zz - zc[sel, None])
                hit = d < half_h[sel, None]
                core = d < half_h[sel, None] * np.float32(0.55)
                pi, pk = np.nonzero(hit)
                vals = np.where(core[pi, pk], np.uint8(Tissue.RIB_MARROW), np.uint8(Tissue.RIB_CORTEX))
                tissues[rx[sel][pi], ry[sel][pi], kz[2].start + pk] = vals
            k += 1

    # ---- intensities: tissue means, texture, partial-volume blur, noise
    image = hu[tissues]
    image += tex_amp[tissues] * _smooth_field(rng, grid, float(u(6, 12)))
    for axis in (0, 1):  # [1 2 1] / 4 in-plane: partial volume at edges
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        blurred = image[tuple(mid)] * np.float32(0.5) + (image[tuple(lo)] + image[tuple(hi)]) * np.float32(0.25)
        image[tuple(mid)] = blurred
        del blurred
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_sigma)
    np.clip(image, *HU_RANGE, out=image)
    image = np.rint(image).astype(np.int16)
    label = (tissues == Tissue.SPLEEN).astype(np.uint8)

    affine = grid.affine
    img_o, aff_o = _reorient(image, affine, codes)
    lab_o, _ = _reorient(label, affine, codes)
    tis_o, _ = _reorient(tissues, affine, codes)
    params = {
        "body_mm": [2 * a, 2 * b],
        "spleen_target_ml": volume_ml,
        "spleen_ml": float(label.sum()) * voxel_ml,
        "noise_sigma": noise_sigma,
        "liver_hu": float(hu[Tissue.LIVER]),
        "spleen_hu": float(hu[Tissue.SPLEEN]),
        "has_stomach": has_stomach,
        "has_gallbladder": has_gb,
    }
    return Phantom(img_o, lab_o, aff_o, tis_o, codes, spacing_mm, seed, params)  # type: ignore[arg-type]


def make_phantom(
    seed: int,
    orientation: str | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU, label uint8 0/1, 4x4 affine) of one case; deterministic per seed.

    orientation/spacing None: drawn from the seed (orientation cycles RAS, LPS, LAS with the
    seed; spacing in-plane 0.6-1.0 mm, slices 1.5-5 mm). ``spacing`` is the voxel size in mm
    along world x, y, z. The anatomy in world coordinates depends on the seed alone.
    """
    p = generate_case(seed, orientation, spacing)
    return p.image, p.label, p.affine


# --------------------------------------------------------------------------------------------
# the dataset


def _nifti_header() -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    return hdr  # qform/sform codes 0 here become 1 (scanner) in save_nifti


def _record(seed: int, cases: int, test_cases: int, labelmap_cases: int = 0, val_per_source: int = 0) -> dict:
    rec = {"generator": GENERATOR, "seed": int(seed), "cases": int(cases), "test_cases": int(test_cases), "version": VERSION}
    if labelmap_cases or val_per_source:
        rec.update(labelmap_cases=int(labelmap_cases), val_per_source=int(val_per_source))
    return rec


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, record: dict) -> bool:
    """``folder`` holds the synthetic set ``record`` describes, every listed file present."""
    meta = _read_meta(folder)
    if not isinstance(meta, dict) or meta.get("synthetic") != record:
        return False
    files = [e[k] for e in meta.get("training", []) for k in ("image", "label", "tissue") if k in e] + list(meta.get("test", []))
    return all((folder / f).is_file() for f in files)


def _remove_stale_partials(root: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Partial folders that interrupted runs left behind (a running one is younger)."""
    now = time.time()
    for p in root.glob(f".{name}.partial-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


#: the case list of a set: (case index, source name, fold) -- fold "validation" or "training"
def case_plan(cases: int, labelmap_names: list[str], labelmap_cases: int, val_per_source: int) -> list[tuple[int, str, str]]:
    """Which case is what: phantoms first, then ``labelmap_cases`` cases of each label map.

    Within each source the last ``val_per_source`` cases validate (0: no folds recorded; the
    tutorial's rule, the last cases of the sorted list, then applies).
    """
    plan, index = [], 0
    groups = [("phantom", cases)] + [(f"labelmap:{n}", labelmap_cases) for n in labelmap_names]
    for source, n in groups:
        for k in range(n):
            index += 1
            fold = "validation" if val_per_source and k >= n - val_per_source else "training"
            plan.append((index, source, fold))
    return plan


def dataset_json(name: str, cases: int, test_cases: int, seed: int, plan: list[tuple[int, str, str]] | None = None,
                 labelmap_cases: int = 0, val_per_source: int = 0) -> dict:
    """The ``dataset.json`` of a synthetic set, in the MSD Task09 layout.

    Beyond MSD's keys, each training entry of a set with tissue maps names its ``tissue`` map
    (``tissuesTr/``, the painter's tissue codes), its ``source`` and its ``fold``.
    """
    if plan is None:
        entries = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(1, cases + 1)]
    else:
        entries = [
            {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz",
             "tissue": f"./tissuesTr/spleen_{i}.nii.gz", "source": source, **({"fold": fold} if val_per_source else {})}
            for i, source, fold in plan
        ]
    n_train = len(entries)
    return {
        "name": name,
        "description": "Synthetic CT-like abdominal images with spleen labels (not patient data): phantoms"
        + (" and CT painted on deformed real label maps" if labelmap_cases else ""),
        "reference": "spleen_utils.synthetic; layout of the Medical Segmentation Decathlon Task09 Spleen",
        "licence": "CC0 1.0 (generated data)" + ("; label-map cases derive from CC BY 4.0 / Apache-2.0 label maps, "
                                                 "see spleen_utils/samples/README.md" if labelmap_cases else ""),
        "release": f"{GENERATOR} v{VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": n_train,
        "numTest": test_cases,
        "training": entries,
        "test": [f"./imagesTs/spleen_{i}.nii.gz" for i in range(n_train + 1, n_train + test_cases + 1)],
        "synthetic": _record(seed, cases, test_cases, labelmap_cases, val_per_source),
    }


def write_synthetic_dataset(
    root: str | Path = "data",
    cases: int = 12,
    test_cases: int = 3,
    seed: int = 0,
    name: str = "Synthetic_Spleen",
    progress: bool = True,
    labelmap_cases: int = 0,
    val_per_source: int = 0,
) -> Path:
    """Write root/name/ in MSD layout; returns that folder.

    Case ``spleen_i`` is ``make_phantom(case_seed(seed, i))``: training cases are 1..cases
    (image and label), test cases continue the numbering (image only). Nothing is done when the
    folder already holds this very set (same generator version, seed and counts). Otherwise the
    set is written into a hidden sibling folder and renamed into place once complete, so a folder
    named ``name`` is never half-written; an older synthetic set is replaced only then. A folder of
    that name that this generator did not write (no ``"synthetic"`` record) is never replaced.
    """
    cases, test_cases, seed = int(cases), int(test_cases), int(seed)
    if cases < 1 or test_cases < 0 or cases + test_cases >= CASES_PER_SEED:
        raise DataError(f"cannot write {cases} training and {test_cases} test cases; use 1 to {CASES_PER_SEED - 1} cases in all.")
    if seed < 0:
        raise DataError(f"the synthetic dataset's seed must be >= 0, not {seed}.")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise DataError(f"{name!r} is not a folder name.")
    root = Path(root)
    target = root / name
    record = _record(seed, cases, test_cases, labelmap_cases, val_per_source)
    if _complete(target, record):
        return target
    if target.exists():
        meta = _read_meta(target)
        ours = isinstance(meta, dict) and isinstance(meta.get("synthetic"), dict) and meta["synthetic"].get("generator") == GENERATOR
        if not target.is_dir() or not (ours or not any(target.iterdir())):
            raise DataError(
                f"{target}: exists and was not written by {GENERATOR}; move it away or choose another name, "
                "it will not be overwritten."
            )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        tissues = bool(labelmap_cases or val_per_source)
        for sub in ("imagesTr", "labelsTr", "imagesTs") + (("tissuesTr",) if tissues else ()):
            (partial / sub).mkdir()
        maps = _label_map_sources() if labelmap_cases else []
        plan = case_plan(cases, [m.name for m in maps], labelmap_cases, val_per_source) if tissues else None
        n_train = len(plan) if plan else cases
        sources = dict((i, src) for i, src, _ in plan) if plan else {}
        jobs = [(i, sources.get(i, "phantom"), case_seed(seed, i), str(partial), i <= n_train, tissues)
                for i in range(1, n_train + test_cases + 1)]
        workers = max(1, min(os.cpu_count() or 1, 4, len(jobs) // 4))
        step = f"generating {name}"
        report(step, 0, len(jobs), unit="case")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc=f"synthetic {name}", unit="case")
        if workers > 1:  # cases are independent and deterministic per seed: any order, same files
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                for done, _ in enumerate(pool.map(_write_case, jobs), 1):
                    report(step, done, len(jobs), unit="case")
                    if bar is not None:
                        bar.update()
        else:
            for done, job in enumerate(jobs, 1):
                _write_case(job)
                report(step, done, len(jobs), unit="case")
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        meta = dataset_json(name, cases, test_cases, seed, plan, labelmap_cases, val_per_source)
        (partial / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        _make_readable(partial)
        _swap_into_place(partial, target, record)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _label_map_sources() -> list:
    """The real label maps shipped with the package (:func:`spleen_utils.samples.label_maps`)."""
    from .samples import label_maps

    return label_maps()


#: label-map anatomies loaded in this process (each is read and resampled once per process)
_ANATOMIES: dict[str, Any] = {}


def _labelmap_case(name: str, seed: int) -> Phantom:
    """Case ``seed`` from the shipped label map ``name``."""
    from . import labelmaps

    if name not in _ANATOMIES:
        m = next(m for m in _label_map_sources() if m.name == name)
        _ANATOMIES[name] = labelmaps.resample_nearest(labelmaps.load_anatomy(m.path, m.labels, m.scheme, m.name))
    return labelmaps.make_case(_ANATOMIES[name], seed)


def _worker_init() -> None:
    try:  # one thread per worker process: the workers already use every core
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _write_case(job: tuple) -> int:
    """Generate case ``i`` of a set and write its files into the partial folder."""
    i, source, seed, folder, training, tissues = job
    folder = Path(folder)
    case = generate_case(seed) if source == "phantom" else _labelmap_case(source.split(":", 1)[1], seed)
    hdr = _nifti_header()
    if training:
        save_nifti(case.image, case.affine, folder / "imagesTr" / f"spleen_{i}.nii.gz", header=hdr)
        save_nifti(case.label, case.affine, folder / "labelsTr" / f"spleen_{i}.nii.gz", header=hdr)
        if tissues:
            save_nifti(case.tissues, case.affine, folder / "tissuesTr" / f"spleen_{i}.nii.gz", header=hdr)
    else:
        save_nifti(case.image, case.affine, folder / "imagesTs" / f"spleen_{i}.nii.gz", header=hdr)
    return i


def _make_readable(folder: Path) -> None:
    """mkdtemp / mkstemp create private folders and files; a dataset is not private."""
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _swap_into_place(partial: Path, target: Path, record: dict) -> None:
    """Rename the complete ``partial`` to ``target``, replacing an older set only now."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        os.rename(partial, target)
    except OSError:
        if _complete(target, record):  # another process wrote the same set first
            return
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_profile_dataset(cfg, progress: bool = True) -> Path:
    """The generated set a :class:`spleen_utils.config.Config` trains on (idempotent, see above)."""
    return write_synthetic_dataset(cfg.data_root, cases=cfg.synthetic_cases, test_cases=cfg.synthetic_test_cases,
                                   seed=cfg.seed, name=cfg.dataset, progress=progress,
                                   labelmap_cases=cfg.labelmap_cases, val_per_source=cfg.val_per_source)
