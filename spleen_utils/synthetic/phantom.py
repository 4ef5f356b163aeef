"""One phantom: anatomy -> appearance -> header, all drawn from one generator per case."""

from __future__ import annotations

import numpy as np

from .anatomy import Anatomy, Tissue, paint_anatomy
from .appearance import Look, render
from .header import Phantom, Sampling, case_orientation, sampling_grid, stored_case


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
    # the draws, in this order: sampling (always drawn, so that overrides do not change the
    # anatomy), anatomy, the case's HU; then the grid, and the two steps that paint on it
    sampling = Sampling.draw(rng)
    codes = case_orientation(seed, orientation)
    anatomy = Anatomy(rng)
    look = Look.draw(rng)
    body = anatomy.body
    grid = sampling_grid(sampling, max(body.a, body.b), *anatomy.spleen.slab(sampling), spacing)

    tissues = paint_anatomy(anatomy, grid, rng, seed)
    image = render(tissues, look, grid, rng)
    label = (tissues == Tissue.SPLEEN).astype(np.uint8)
    params = {
        "body_mm": [2 * body.a, 2 * body.b],
        "spleen_target_ml": anatomy.spleen.volume_ml,
        "spleen_ml": float(label.sum()) * (float(np.prod(grid.spacing)) / 1000.0),
        "noise_sigma": look.noise_sigma,
        "liver_hu": float(look.hu[Tissue.LIVER]),
        "spleen_hu": float(look.hu[Tissue.SPLEEN]),
        "has_stomach": anatomy.organs.has_stomach,
        "has_gallbladder": anatomy.organs.has_gb,
    }
    return stored_case(image, label, tissues, grid.affine, codes, grid.spacing, seed, params)


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
