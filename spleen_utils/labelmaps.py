"""Anatomy from real label maps: deform a real multi-organ map, fill in the body, paint it as CT.

A phantom's anatomy is a drawing; a label map's is a person's. Each case made here takes one of
the real abdominal label maps shipped in :mod:`spleen_utils.samples` (TotalSegmentator's and
AMOS's classes), and

1. **anatomy**: maps its classes to the painter's tissues (:data:`spleen_utils.appearance`
   codes), adds what the map does not draw (kidney medulla, stomach content and gas, bowel gas,
   bone cortex, the body outline with subcutaneous fat and an abdominal-wall muscle layer, and a
   mix of fat, soft tissue and bowel where nothing is labelled), then deforms it: a random
   affine (rotation, scaling), a smooth elastic field and a local scaling of the spleen alone
   (0.42-3x its volume, since real spleens range from under 100 mL to over 700 mL);
2. **field of view**: a random slab along z around the spleen, sometimes cutting its top or
   bottom, sampled at a random voxel size (1.2-2 mm in plane, 1.5-5 mm slices);
3. **appearance**: :func:`spleen_utils.appearance.paint` with a random contrast phase;
4. **header**: stored in RAS, LPS or LAS like the phantoms.

Every step draws from one :class:`numpy.random.Generator` seeded per case: deterministic.
The patient's left-right is never flipped (the spleen is on the left in every real body).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import appearance as ap
from .errors import DataError

#: TotalSegmentator ``total`` class names (by prefix) -> tissue code; first match wins
_TOTALSEG_RULES: tuple[tuple[str, int], ...] = (
    ("spleen", ap.SPLEEN), ("kidney_cyst", ap.GALLBLADDER), ("kidney", ap.KIDNEY_CORTEX),
    ("gallbladder", ap.GALLBLADDER), ("liver", ap.LIVER), ("stomach", ap.STOMACH_WALL),
    ("pancreas", ap.PANCREAS), ("adrenal", ap.SOFT), ("lung", ap.LUNG), ("trachea", ap.GAS),
    ("esophagus", ap.STOMACH_WALL), ("thyroid", ap.SOFT), ("small_bowel", ap.BOWEL), ("duodenum", ap.BOWEL),
    ("colon", ap.COLON), ("urinary_bladder", ap.BLADDER), ("prostate", ap.SOFT),
    ("costal_cartilages", ap.DISC), ("rib", ap.RIB_CORTEX), ("spinal_cord", ap.SPINAL_CANAL),
    ("heart", ap.HEART), ("atrial_appendage", ap.HEART), ("pulmonary", ap.HEART),
    ("aorta", ap.AORTA), ("iliac_artery", ap.AORTA), ("brachiocephalic_trunk", ap.AORTA),
    ("subclavian_artery", ap.AORTA), ("common_carotid", ap.AORTA),
    ("portal_vein", ap.PORTAL_VEIN), ("inferior_vena_cava", ap.IVC), ("superior_vena_cava", ap.IVC),
    ("iliac_vena", ap.IVC), ("brachiocephalic_vein", ap.IVC),
    ("gluteus", ap.MUSCLE), ("autochthon", ap.MUSCLE), ("iliopsoas", ap.MUSCLE),
    ("sacrum", ap.BONE_CANCELLOUS), ("vertebrae", ap.BONE_CANCELLOUS), ("hip", ap.BONE_CANCELLOUS),
    ("femur", ap.BONE_CANCELLOUS), ("humerus", ap.BONE_CANCELLOUS), ("scapula", ap.BONE_CANCELLOUS),
    ("clavicula", ap.BONE_CANCELLOUS), ("sternum", ap.BONE_CANCELLOUS), ("skull", ap.BONE_CANCELLOUS),
    ("brain", ap.SOFT),
)
#: AMOS22 values -> tissue code
_AMOS = {1: ap.SPLEEN, 2: ap.KIDNEY_CORTEX, 3: ap.KIDNEY_CORTEX, 4: ap.GALLBLADDER, 5: ap.STOMACH_WALL, 6: ap.LIVER,
         7: ap.STOMACH_WALL, 8: ap.AORTA, 9: ap.IVC, 10: ap.PANCREAS, 11: ap.SOFT, 12: ap.SOFT, 13: ap.BOWEL,
         14: ap.BLADDER, 15: ap.SOFT}

#: the unlabelled marker used while building (never stored)
_UNLABELLED = 255
_BONES = (ap.BONE_CANCELLOUS, ap.RIB_CORTEX)


def tissue_lut(labels: dict[int, str], scheme: str) -> np.ndarray:
    """A lookup table label value -> tissue code (unknown structures become soft tissue)."""
    top = max([0, *labels]) + 1
    lut = np.full(max(top, 256), ap.SOFT, np.uint8)
    lut[0] = _UNLABELLED
    for value, name in labels.items():
        if value == 0:
            continue
        if scheme == "amos":
            lut[value] = _AMOS.get(int(value), ap.SOFT)
            continue
        name = str(name).lower()
        for prefix, tissue in _TOTALSEG_RULES:
            if name.startswith(prefix):
                lut[value] = tissue
                break
    return lut


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine.copy()


@dataclass
class Anatomy:
    """A label map turned into tissue codes on its own (canonical RAS) grid."""

    tissues: np.ndarray  # uint8 tissue codes, _UNLABELLED inside the body where nothing is drawn
    affine: np.ndarray
    name: str
    #: what every case of this anatomy computes alike (the organs' hull, distance maps), kept after
    #: the first case: the tissues must not change meanwhile
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def remember(self, key: str, make):
        """``make()`` computed once per anatomy (it must not depend on a case's random draws)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def load_anatomy(path: str | Path, labels: dict[int, str], scheme: str, name: str | None = None) -> Anatomy:
    """The label map at ``path`` as tissue codes (RAS), with the spleen checked to be there."""
    values, affine = _canonical(Path(path))
    if values.ndim != 3:
        raise DataError(f"{path}: a label map must be 3D, not {values.ndim}D.")
    lut = tissue_lut(labels, scheme)
    if values.max() >= lut.size or values.min() < 0:
        raise DataError(f"{path}: label values outside 0..{lut.size - 1}.")
    tissues = lut[values.astype(np.intp)]
    if not (tissues == ap.SPLEEN).any():
        raise DataError(f"{path}: the label map has no spleen.")
    return Anatomy(tissues, affine, name or Path(path).name.split(".")[0])


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return np.array([i[0] for i in idx]), np.array([i[-1] + 1 for i in idx])


def _organ_hull(labelled: np.ndarray) -> np.ndarray:
    """The labelled voxels' convex hull, slice by slice (a slice with almost none takes the last hull)."""
    from skimage.morphology import convex_hull_image

    body = np.zeros(labelled.shape, bool)
    hull_prev = None
    for k in range(labelled.shape[2]):
        sl = labelled[:, :, k]
        if sl.sum() > 20:
            hull_prev = convex_hull_image(sl)
        if hull_prev is not None:
            body[:, :, k] = hull_prev
    return body


def _fill_body(t: np.ndarray, anatomy: Anatomy, rng: np.random.Generator, sparse: bool) -> np.ndarray:
    """Body outline, subcutaneous fat, wall muscle and the unlabelled inside, slice by slice.

    ``t`` derives from ``anatomy``'s tissues and is labelled where they are, so the distance to the
    organs' hull is computed once per anatomy, not once per case.
    """
    spacing = anatomy.spacing
    labelled = t != _UNLABELLED
    fat_mm = float(rng.uniform(8, 35)) + (float(rng.uniform(15, 35)) if sparse else 0.0)
    wall_mm = float(rng.uniform(6, 14))

    def hull_distance() -> np.ndarray:
        # the body: the organs' hull grown by the fat; distance to the outside gives the layers
        return ndimage.distance_transform_edt(~_organ_hull(labelled), sampling=spacing)

    outside_dist = anatomy.remember("hull_distance", hull_distance)
    body_out = outside_dist <= fat_mm + wall_mm
    depth = np.zeros(t.shape, np.float32)
    for k in range(t.shape[2]):
        if body_out[:, :, k].any():
            depth[:, :, k] = ndimage.distance_transform_edt(body_out[:, :, k], sampling=spacing[:2])
    out = t.copy()
    free = ~labelled
    out[free & ~body_out] = ap.AIR
    out[free & body_out & (depth <= fat_mm)] = ap.FAT
    out[free & body_out & (depth > fat_mm) & (depth <= fat_mm + wall_mm)] = ap.MUSCLE
    inner = free & body_out & (depth > fat_mm + wall_mm)
    mix = ap.smooth_field(rng, t.shape, tuple(float(rng.uniform(6, 12)) / spacing))
    thr_fat, thr_bowel = float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.6, 1.2))
    filler = np.where(mix > thr_bowel, np.uint8(ap.BOWEL), np.where(mix > thr_fat, np.uint8(ap.SOFT), np.uint8(ap.FAT)))
    out[inner] = filler[inner]
    return out


def _details(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """What label maps do not draw: medulla, stomach content and gas, bowel gas, bone cortex.

    Each structure's depth map is computed once per anatomy, not once per case.
    """
    t, spacing = anatomy.tissues, anatomy.spacing
    out = t.copy()
    for tissue, inner_tissue, depth_mm in ((ap.KIDNEY_CORTEX, ap.KIDNEY_MEDULLA, rng.uniform(3.5, 6.5)),
                                           (ap.STOMACH_WALL, ap.STOMACH_CONTENT, rng.uniform(3, 5)),
                                           (ap.BONE_CANCELLOUS, ap.BONE_CANCELLOUS, 0.0),
                                           (ap.RIB_CORTEX, ap.RIB_MARROW, rng.uniform(1.5, 2.5))):
        def depth(tissue=tissue):  # (box, mask in it, distance from its surface), or None when absent
            m = t == tissue
            if not m.any():
                return None
            lo, hi = _bbox(m)
            box = tuple(slice(max(a - 2, 0), b + 2) for a, b in zip(lo, hi))
            return box, m[box], ndimage.distance_transform_edt(m[box], sampling=spacing)

        found = anatomy.remember(f"depth:{tissue}", depth)
        if found is None:
            continue
        box, sub, d = found
        if tissue == ap.BONE_CANCELLOUS:  # a 1.5-2.5 mm cortex around cancellous bone
            view = out[box]
            view[sub & (d <= rng.uniform(1.5, 2.5))] = ap.BONE_CORTEX
            continue
        view = out[box]
        view[sub & (d > depth_mm)] = inner_tissue
    # gas: the anterior part of the stomach's content (supine), pockets in bowel and colon
    content = out == ap.STOMACH_CONTENT
    if content.any() and rng.uniform() < 0.6:
        ys = np.nonzero(content)[1]
        level = np.percentile(ys, rng.uniform(40, 90))
        yy = np.arange(t.shape[1])[None, :, None]
        out[content & (yy > level)] = ap.GAS
    hollow = (out == ap.BOWEL) | (out == ap.COLON)
    if hollow.any():
        gas = ap.smooth_field(rng, t.shape, tuple(8.0 / spacing))
        out[hollow & (gas > rng.uniform(0.8, 1.6))] = ap.GAS
    return out


def prepare_anatomy(anatomy: Anatomy, rng: np.random.Generator, sparse: bool | None = None) -> Anatomy:
    """Details and the body filled in (``sparse``: a map with few classes, such as AMOS's)."""
    t = anatomy.tissues
    if sparse is None:
        sparse = int((t == ap.MUSCLE).sum()) == 0
    t = _details(anatomy, rng)
    t = _fill_body(t, anatomy, rng, sparse)
    return Anatomy(t, anatomy.affine, anatomy.name)


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    r = np.eye(3)
    for axis, lim in enumerate(max_deg):
        t = np.deg2rad(rng.uniform(-lim, lim))
        c, s = np.cos(t), np.sin(t)
        i, j = [a for a in range(3) if a != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = r @ m
    return r


def deform(anatomy: Anatomy, rng: np.random.Generator, spacing: tuple[float, float, float],
           z_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tissue codes resampled (nearest) through a random deformation onto a new RAS grid.

    Returns the tissue array and its affine (diagonal, ``spacing`` mm). ``z_range`` (world mm,
    after deformation) limits the slab; by default the whole deformed body is kept.
    """
    src = anatomy.tissues
    src_aff = anatomy.affine
    spleen_vox = np.argwhere(src == ap.SPLEEN)
    spleen_c = (src_aff @ np.r_[spleen_vox.mean(axis=0), 1.0])[:3]
    body_lo, body_hi = _bbox(src != ap.AIR)
    corners = np.array([[body_lo[0], body_lo[1], body_lo[2]], [body_hi[0], body_hi[1], body_hi[2]]], float)
    world = (src_aff[:3, :3] @ corners.T).T + src_aff[:3, 3]
    w_lo, w_hi = world.min(axis=0), world.max(axis=0)
    centre = (w_lo + w_hi) / 2.0

    # forward model: x_out = centre + A (x_src - centre); sampling uses its inverse
    scale = float(np.exp(rng.uniform(np.log(0.85), np.log(1.15))))
    aniso = np.exp(rng.uniform(np.log(0.94), np.log(1.06), size=3))
    a_mat = _rotation(rng, (4.0, 4.0, 10.0)) @ np.diag(scale * aniso)
    a_inv = np.linalg.inv(a_mat)
    spleen_out = centre + a_mat @ (spleen_c - centre)
    spleen_scale = float(np.exp(rng.uniform(np.log(0.75), np.log(1.45))))  # linear: 0.42-3x the volume
    spleen_radius = float((spleen_vox.shape[0] * np.prod(anatomy.spacing) * 3 / (4 * np.pi)) ** (1 / 3)) * scale
    elastic_mm = float(rng.uniform(2, 6))
    elastic_cell = float(rng.uniform(35, 60))

    half = np.abs(a_mat) @ ((w_hi - w_lo) / 2.0) + 10.0
    lo, hi = centre - half, centre + half
    if z_range is not None:
        lo[2], hi[2] = max(lo[2], z_range[0]), min(hi[2], z_range[1])
        if hi[2] - lo[2] < 4 * spacing[2]:
            raise DataError("the requested slab misses the body")
    axes = [np.arange(lo[i], hi[i], spacing[i], dtype=np.float32) for i in range(3)]
    shape = tuple(a.size for a in axes)
    if np.prod(shape, dtype=np.int64) > 40_000_000:
        raise DataError(f"a deformed case of {shape} voxels is too large; use a coarser spacing")
    X, Y, Z = np.meshgrid(*axes, indexing="ij", copy=False)
    p = [X, Y, Z]
    # local scaling of the spleen: points near it sample closer to (s > 1) or further from its centre
    d2 = sum((p[i] - np.float32(spleen_out[i])) ** 2 for i in range(3))
    w = np.exp(-d2 / np.float32(2.0 * (1.6 * spleen_radius * max(spleen_scale, 1.0)) ** 2)).astype(np.float32)
    k = np.float32(1.0 / spleen_scale - 1.0)
    q = [p[i] + w * k * (p[i] - np.float32(spleen_out[i])) for i in range(3)]
    del w, d2
    sp = np.asarray(spacing, np.float32)
    for i in range(3):
        q[i] += np.float32(elastic_mm) * ap.smooth_field(rng, shape, tuple(elastic_cell / sp))
    # back to the source: x_src = centre + A^-1 (q - centre), then to source voxel indices
    m = np.linalg.inv(src_aff)[:3, :3] @ a_inv
    off = np.linalg.inv(src_aff)[:3, :3] @ (centre - a_inv @ centre) + np.linalg.inv(src_aff)[:3, 3]
    coords = np.empty((3, *shape), np.float32)
    for r in range(3):
        coords[r] = np.float32(m[r, 0]) * q[0] + np.float32(m[r, 1]) * q[1] + np.float32(m[r, 2]) * q[2] + np.float32(off[r])
    del q, X, Y, Z, p
    out = ndimage.map_coordinates(src, coords, order=0, mode="constant", cval=ap.AIR, prefilter=False)
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = [float(a[0]) for a in axes]
    return out.astype(np.uint8), affine


def slab_around_spleen(tissues: np.ndarray, affine: np.ndarray, rng: np.random.Generator, cut_prob: float = 0.15) -> tuple[float, float]:
    """A random world z range that holds the spleen (with ``cut_prob``, cuts into it)."""
    zs = np.nonzero((tissues == ap.SPLEEN).any(axis=(0, 1)))[0]
    z0 = affine[2, 3] + affine[2, 2] * zs[0]
    z1 = affine[2, 3] + affine[2, 2] * zs[-1]
    below, above = float(rng.uniform(20, 130)), float(rng.uniform(15, 90))
    lo, hi = z0 - below, z1 + above
    if rng.uniform() < cut_prob:
        cut = float(rng.uniform(0.1, 0.35)) * (z1 - z0)
        if rng.uniform() < 0.5:
            hi = z1 - cut
        else:
            lo = z0 + cut
    return lo, hi


def resample_nearest(anatomy: Anatomy, spacing_mm: float = 2.0, z_half_mm: float = 170.0) -> Anatomy:
    """The anatomy on an isotropic ``spacing_mm`` RAS grid, cut to ``z_half_mm`` around the spleen."""
    t, aff = anatomy.tissues, anatomy.affine
    spleen = np.argwhere(t == ap.SPLEEN).mean(axis=0)
    zc = float((aff @ np.r_[spleen, 1.0])[2])
    lo_v, hi_v = np.zeros(3), np.array(t.shape, float) - 1
    corners = np.array([[x, y, z] for x in (lo_v[0], hi_v[0]) for y in (lo_v[1], hi_v[1]) for z in (lo_v[2], hi_v[2])])
    world = (aff[:3, :3] @ corners.T).T + aff[:3, 3]
    w_lo, w_hi = world.min(axis=0), world.max(axis=0)
    w_lo[2], w_hi[2] = max(w_lo[2], zc - z_half_mm), min(w_hi[2], zc + z_half_mm)
    axes = [np.arange(w_lo[i], w_hi[i] + 1e-3, spacing_mm) for i in range(3)]
    inv = np.linalg.inv(aff)
    grids = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", copy=False)
    coords = np.stack([sum(np.float32(inv[r, c]) * grids[c] for c in range(3)) + np.float32(inv[r, 3]) for r in range(3)])
    out = ndimage.map_coordinates(t, coords, order=0, mode="constant", cval=_UNLABELLED, prefilter=False)
    # outside the map's own field of view nothing is known: treat it as unlabelled (body or air)
    new_aff = np.diag([spacing_mm] * 3 + [1.0])
    new_aff[:3, 3] = [a[0] for a in axes]
    return Anatomy(out.astype(np.uint8), new_aff, anatomy.name)


#: voxel sizes of the generated cases (mm): in plane, and slices (log-uniform)
CASE_INPLANE_MM = (1.2, 2.0)
CASE_SLICE_MM = (1.5, 5.0)


def make_case(anatomy: Anatomy, seed: int, orientation: str | None = None):
    """One CT-like case from a (2 mm, spleen-centred) real anatomy: a :class:`spleen_utils.synthetic.Phantom`."""
    from .synthetic.appearance import to_hu
    from .synthetic.header import ORIENTATIONS, stored_case

    rng = np.random.default_rng(int(seed))
    prepared = prepare_anatomy(anatomy, rng)
    inplane = float(rng.uniform(*CASE_INPLANE_MM))
    slice_mm = float(np.exp(rng.uniform(np.log(CASE_SLICE_MM[0]), np.log(CASE_SLICE_MM[1]))))
    spacing = (inplane, inplane, slice_mm)
    # first a coarse pass to find where the deformed spleen lies, then the slab at full resolution
    state = rng.bit_generator.state
    coarse, coarse_aff = deform(prepared, rng, (4.0, 4.0, 4.0))
    z_range = slab_around_spleen(coarse, coarse_aff, rng)
    after = rng.bit_generator.state
    rng.bit_generator.state = state  # the same deformation again, on the case's own grid
    tissues, affine = deform(prepared, rng, spacing, z_range)
    rng.bit_generator.state = after
    if not (tissues == ap.SPLEEN).any():
        raise DataError(f"label-map case {seed}: the spleen fell outside the field of view")
    image = to_hu(ap.paint(tissues, spacing, rng))
    label = (tissues == ap.SPLEEN).astype(np.uint8)
    codes = ORIENTATIONS[int(seed) % len(ORIENTATIONS)] if orientation is None else orientation
    params = {"source": anatomy.name, "spleen_ml": float(label.sum()) * float(np.prod(spacing)) / 1000.0}
    return stored_case(image, label, tissues, affine, codes, spacing, int(seed), params)
