"""Geometric building blocks of the phantoms: rotations, lobulated ellipsoids, smooth random fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .header import _Grid


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
