"""The appearance step of a phantom: Hounsfield units on its tissue map.

Spleen and liver enhance alike (portal-venous phase as in MSD: a shared 95-135 HU level, each
within +-6 HU of it, so 89-141 HU and at most 12 HU apart in a case), so location and shape, not
intensity, identify the spleen. Low-frequency texture, an in-plane partial-volume blur and
Gaussian noise (sigma 10-25 HU) follow; the image is int16 HU.

(The randomised appearance of the label-map cases and of training crops is
:mod:`spleen_utils.appearance`'s; this one is the phantoms' own, fixed per seed.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import N_TISSUES, Tissue
from .header import _Grid
from .shapes import _smooth_field

HU_RANGE = (-1024, 3071)


@dataclass
class Look:
    """Per-case mean HU and texture amplitude of every tissue, and the noise sigma."""

    hu: np.ndarray
    texture: np.ndarray
    noise_sigma: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Look:
        u = rng.uniform
        hu = np.zeros(N_TISSUES, np.float32)
        tex = np.zeros(N_TISSUES, np.float32)
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
        return cls(hu, tex, float(u(10, 25)))


def render(tissues: np.ndarray, look: Look, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """The int16 HU image of a tissue map: tissue means, texture, partial-volume blur, noise."""
    image = look.hu[tissues]
    image += look.texture[tissues] * _smooth_field(rng, grid, float(rng.uniform(6, 12)))
    for axis in (0, 1):  # [1 2 1] / 4 in-plane: partial volume at edges
        lo = [slice(None)] * 3
        mid = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        blurred = image[tuple(mid)] * np.float32(0.5) + (image[tuple(lo)] + image[tuple(hi)]) * np.float32(0.25)
        image[tuple(mid)] = blurred
        del blurred
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(look.noise_sigma)
    return to_hu(image)


def to_hu(image: np.ndarray) -> np.ndarray:
    """A float image as stored: clipped to the CT range, rounded to int16 HU."""
    np.clip(image, *HU_RANGE, out=image)
    return np.rint(image).astype(np.int16)
