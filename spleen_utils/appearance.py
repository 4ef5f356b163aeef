"""Randomised CT appearance: paint a tissue map with Hounsfield units of a random contrast phase.

Domain randomisation in the spirit of SynthSeg (Billot et al., Medical Image Analysis 2023): a
network that sees the same anatomy under many appearances learns the anatomy, not the texture.
CT has a physical intensity scale, so the randomisation is anchored on it: every tissue of
:class:`spleen_utils.synthetic.Tissue` gets its mean HU from a contrast phase drawn per image
(non-contrast, arterial with a mottled spleen, portal-venous, delayed), each mean jittered on
its own, and with probability ``wild`` the soft tissues get means drawn uniformly over the whole
soft-tissue range instead, so that the spleen may be brighter or darker than anything around it
(only shape and position then tell it apart). Texture (smooth random fields), partial-volume blur,
noise, a smooth additive drift and, now and then, very thick slices follow.

The same painter serves two places:

* :func:`paint` writes the stored image of a generated case (deterministic per seed);
* :class:`spleen_utils.transforms.RandCTAppearanced` repaints every training crop of a case that carries a tissue map,
  so an epoch never shows the same appearance twice. Crops of real scans (no tissue map) pass
  through unchanged.

Phase ranges are typical values from the radiology literature (portal-venous spleen 100-140 HU,
liver 90-130 HU; arterial spleen heterogeneous; non-contrast spleen 40-55 HU, liver a few HU
brighter), widened on purpose: the shipped real scans span 35 HU (non-contrast) to 158 HU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

#: appearance phases and how often each is drawn
PHASES = ("native", "arterial", "portal", "delayed")
PHASE_WEIGHTS = (0.2, 0.2, 0.45, 0.15)

# Tissue codes (kept in sync with spleen_utils.synthetic.Tissue, which imports these names).
AIR, FAT, MUSCLE, BOWEL, GAS, LUNG, HEART, LIVER, GALLBLADDER, STOMACH_WALL, STOMACH_CONTENT = range(11)
KIDNEY_CORTEX, KIDNEY_MEDULLA, AORTA, IVC, SPLEEN, BONE_CANCELLOUS, BONE_CORTEX, DISC, SPINAL_CANAL = range(11, 20)
RIB_CORTEX, RIB_MARROW, PANCREAS, SOFT, BLADDER, COLON, PORTAL_VEIN = range(20, 27)
N_TISSUES = 27

#: (low, high) mean HU per phase; tissues absent here take the "all" entry
_RANGES: dict[str, dict[int, tuple[float, float]]] = {
    "all": {
        AIR: (-1010, -980), FAT: (-120, -80), MUSCLE: (35, 65), BOWEL: (15, 55), GAS: (-1000, -850),
        LUNG: (-900, -780), GALLBLADDER: (-5, 25), STOMACH_WALL: (30, 70), STOMACH_CONTENT: (-10, 40),
        BONE_CANCELLOUS: (130, 300), BONE_CORTEX: (450, 1000), DISC: (60, 110), SPINAL_CANAL: (5, 35),
        RIB_CORTEX: (350, 900), RIB_MARROW: (120, 260), SOFT: (20, 60), BLADDER: (0, 25), COLON: (-60, 40),
    },
    "native": {
        SPLEEN: (30, 58), LIVER: (40, 72), KIDNEY_CORTEX: (22, 42), KIDNEY_MEDULLA: (18, 38), AORTA: (30, 55),
        IVC: (30, 55), PORTAL_VEIN: (30, 55), HEART: (30, 55), PANCREAS: (25, 50), BOWEL: (15, 45),
    },
    "arterial": {
        SPLEEN: (80, 170), LIVER: (55, 95), KIDNEY_CORTEX: (160, 280), KIDNEY_MEDULLA: (60, 120),
        AORTA: (200, 400), IVC: (50, 110), PORTAL_VEIN: (90, 170), HEART: (150, 350), PANCREAS: (90, 150),
        BOWEL: (40, 90), STOMACH_WALL: (60, 120),
    },
    "portal": {
        SPLEEN: (95, 160), LIVER: (85, 150), KIDNEY_CORTEX: (140, 230), KIDNEY_MEDULLA: (110, 200),
        AORTA: (120, 220), IVC: (100, 180), PORTAL_VEIN: (130, 220), HEART: (110, 200), PANCREAS: (70, 130),
        BOWEL: (30, 80), STOMACH_WALL: (50, 110),
    },
    "delayed": {
        SPLEEN: (70, 115), LIVER: (70, 115), KIDNEY_CORTEX: (120, 200), KIDNEY_MEDULLA: (130, 260),
        AORTA: (90, 150), IVC: (90, 150), PORTAL_VEIN: (90, 150), HEART: (90, 150), PANCREAS: (60, 100),
        BOWEL: (30, 70), STOMACH_WALL: (45, 90),
    },
}
#: the tissues whose means the "wild" draw randomises over the whole soft-tissue range
_SOFT = (MUSCLE, BOWEL, HEART, LIVER, GALLBLADDER, STOMACH_WALL, STOMACH_CONTENT, KIDNEY_CORTEX, KIDNEY_MEDULLA,
         AORTA, IVC, SPLEEN, PANCREAS, SOFT, BLADDER, PORTAL_VEIN, DISC, SPINAL_CANAL)
_WILD_RANGE = (-30.0, 230.0)
#: texture amplitude (HU, standard deviation of the smooth field) per tissue
_TEXTURE = np.full(N_TISSUES, 6.0, np.float32)
_TEXTURE[[AIR, GAS]] = 15.0
_TEXTURE[LUNG] = 30.0
_TEXTURE[[BONE_CANCELLOUS, RIB_MARROW]] = 30.0
_TEXTURE[[BONE_CORTEX, RIB_CORTEX]] = 60.0
_TEXTURE[[BOWEL, COLON]] = 18.0
_TEXTURE[FAT] = 8.0


def draw_appearance(rng: np.random.Generator, wild: float = 0.25) -> dict[str, Any]:
    """One random appearance: mean HU and texture amplitude per tissue, phase, noise, blur."""
    phase = str(rng.choice(PHASES, p=PHASE_WEIGHTS))
    ranges = dict(_RANGES["all"])
    ranges.update(_RANGES[phase])
    mean = np.zeros(N_TISSUES, np.float32)
    for t in range(N_TISSUES):
        lo, hi = ranges.get(t, (20.0, 60.0))
        mean[t] = rng.uniform(lo, hi)
    is_wild = bool(rng.uniform() < wild)
    if is_wild:
        for t in _SOFT:
            mean[t] = rng.uniform(*_WILD_RANGE)
    # a small shift shared by all soft tissues (scanner calibration, patient size)
    mean[list(_SOFT)] += np.float32(rng.uniform(-10, 10))
    texture = _TEXTURE * np.float32(rng.uniform(0.5, 1.6))
    # the arterial spleen is mottled: strong, small-scale heterogeneity
    spleen_mottle = float(rng.uniform(15, 45)) if phase == "arterial" and rng.uniform() < 0.7 else 0.0
    return {
        "phase": "wild" if is_wild else phase,
        "mean": mean,
        "texture": texture,
        "spleen_mottle": spleen_mottle,
        "texture_mm": float(rng.uniform(5, 15)),
        "noise": float(rng.uniform(4, 25)),
        "blur_mm": (float(rng.uniform(0.0, 1.5)), float(rng.uniform(0.0, 2.5))),  # in-plane, along z
        "drift": float(rng.uniform(0, 12)),
        # now and then very thick slices (8-32 mm: old or down-sampled scans), as blocks along z
        "thick_mm": float(rng.uniform(8, 32)) if rng.uniform() < 0.15 else 0.0,
    }


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: tuple[float, ...]) -> np.ndarray:
    """A smooth random field of about unit variance: coarse white noise, smoothed, linearly upsampled.

    ``cell`` is the correlation length in voxels along each axis. The upsampling is PyTorch's
    trilinear interpolation (an order of magnitude faster than ``scipy.ndimage.zoom`` here; this
    runs on every training patch).
    """
    import torch

    counts = [max(2, int(np.ceil(n / max(c, 1e-3))) + 2) for n, c in zip(shape, cell)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(counts).astype(np.float32), 0.7, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=tuple(int(n) for n in shape),
                                         mode="trilinear", align_corners=True)
    return up[0, 0].numpy()


def paint(tissues: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator,
          appearance: dict[str, Any] | None = None, wild: float = 0.25) -> np.ndarray:
    """HU image (float32) of a tissue map on a grid of ``spacing`` mm, in one random appearance."""
    a = draw_appearance(rng, wild) if appearance is None else appearance
    t = np.asarray(tissues).astype(np.intp, copy=False)
    t = np.clip(t, 0, N_TISSUES - 1)
    sp = np.asarray(spacing, np.float32)
    image = a["mean"][t]
    field = smooth_field(rng, t.shape, tuple(a["texture_mm"] / sp))
    image += a["texture"][t] * field
    if a["spleen_mottle"] > 0:
        spleen = t == SPLEEN
        if spleen.any():
            mottle = smooth_field(rng, t.shape, tuple(6.0 / sp))
            image[spleen] += np.float32(a["spleen_mottle"]) * mottle[spleen]
    blur = np.array([a["blur_mm"][0], a["blur_mm"][0], a["blur_mm"][1]], np.float32) / sp
    if blur.max() > 0.2:
        image = ndimage.gaussian_filter(image, sigma=blur, mode="nearest", truncate=3.0)
    if a["drift"] > 0:
        image += np.float32(a["drift"]) * smooth_field(rng, t.shape, tuple(120.0 / sp))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(a["noise"])
    k = int(round(a.get("thick_mm", 0.0) / float(sp[2])))
    if k > 1 and image.shape[2] > k:  # each block of k slices becomes its mean (axis 2 is z, RAS)
        n = image.shape[2] // k * k
        means = image[:, :, :n].reshape(image.shape[0], image.shape[1], -1, k).mean(axis=3)
        image[:, :, :n] = np.repeat(means, k, axis=2)
        if n < image.shape[2]:
            image[:, :, n:] = image[:, :, n:].mean(axis=2, keepdims=True)
    return image
