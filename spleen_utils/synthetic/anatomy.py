"""The anatomy step of a phantom: where every tissue lies, as a map of :class:`Tissue` codes.

Each case is an upper-abdominal CT slab:

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

Anatomy is built in patient coordinates (mm, RAS+: +x towards the patient's right, so the patient's
left has negative x; +y anterior; +z superior). Its draws (:func:`draw_anatomy`) come first and do
not depend on the sampling grid; :func:`paint_anatomy` then paints them on the grid.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from scipy import ndimage

from .. import appearance as ap
from ..errors import DataError
from .header import Z_EXTENT_MM, Sampling, _Grid
from .shapes import _Ellipsoid, _lobes, _rot_y, _rot_z, _smooth_field

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


N_TISSUES = len(Tissue)
#: the spleen of every case lies in this range (its voxel volume, checked while building).
SPLEEN_VOLUME_ML = (100.0, 350.0)


def _phi_post(th):
    """Angular distance from the posterior midline, 0..pi."""
    return np.abs(np.angle(np.exp(1j * (th + np.pi / 2))))


class Body:
    """The body outline (a perturbed super-ellipse) and its wall: subcutaneous fat, then muscle."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.a = float(u(140, 165))  # half width (mm)
        self.b = float(u(100, 120))  # half depth
        self.bx, self.by = float(u(-5, 5)), float(u(-5, 5))  # body centre (the scanner's isocentre is 0, 0)
        self.p_super = float(u(2.0, 2.6))
        self.outline = [(k, float(u(0.005, 0.02)), float(u(0, 2 * np.pi))) for k in (2, 3, 4)]
        self.fat_base = float(u(10, 28))
        self.fat_ant = float(u(0.2, 0.8))
        self.mus_base = float(u(8, 13))
        self.paraspinal = float(u(30, 40))
        # approximate cavity half axes
        self.ac, self.bc = self.a - self.fat_base - self.mus_base, self.b - self.fat_base - self.mus_base

    def r_body(self, th):
        p = self.p_super
        c, s = np.abs(np.cos(th)), np.abs(np.sin(th))
        r = (c**p / self.a**p + s**p / self.b**p) ** (-1.0 / p)
        for k, amp, ph in self.outline:
            r = r * (1.0 + amp * np.cos(k * th + ph))
        return r

    def t_fat(self, th):
        return self.fat_base * (1.0 + self.fat_ant * np.maximum(np.sin(th), 0.0))

    def t_mus(self, th):
        return self.mus_base + self.paraspinal * np.exp(-((_phi_post(th) / 0.38) ** 2))

    def r_cav(self, th):
        return self.r_body(th) - self.t_fat(th) - self.t_mus(th)

    def wall_point(self, t: float) -> np.ndarray:
        return np.array([self.bx, self.by, 0.0]) + float(self.r_cav(t)) * np.array([np.cos(t), np.sin(t), 0.0])


class Spleen:
    """The spleen: against the left posterolateral wall, thin axis along the wall normal."""

    def __init__(self, rng: np.random.Generator, body: Body):
        u = rng.uniform
        self.body = body
        self.zsp = float(u(-150, 150))  # world z of the spleen's centre (table position)
        self.volume_ml = float(u(120, 320))
        rw, rt = float(u(0.6, 0.8)), float(u(0.35, 0.45))
        self.theta = float(np.deg2rad(u(198, 220)))  # angle around the body centre: left (x<0), posterior (y<0)
        tilt = float(u(15, 40))
        self.gap = float(u(3, 8))
        self.hilum_depth = float(u(0.9, 1.2))
        self.lobes = _lobes(rng, 4, (0.03, 0.07), (2.0, 4.0))

        tangent = body.wall_point(self.theta + 1e-3) - body.wall_point(self.theta - 1e-3)
        tangent /= np.linalg.norm(tangent)
        self.normal = np.array([tangent[1], -tangent[0], 0.0])  # outward (the curve runs anticlockwise)
        if tangent[1] > 0:  # the superior end of the long axis leans posterior
            tangent = -tangent
        e_long = np.cos(np.deg2rad(tilt)) * np.array([0.0, 0.0, 1.0]) + np.sin(np.deg2rad(tilt)) * tangent
        e_wide = np.cross(self.normal, e_long)
        self.axes = np.stack([e_long, e_wide, self.normal], axis=1)
        self.ratios = np.array([1.0, rw, rt])
        self.length = (3.0 * self.volume_ml * 1000.0 * 1.1 / (4.0 * np.pi * rw * rt)) ** (1.0 / 3.0)

    def shape(self, scale: float) -> tuple[_Ellipsoid, _Ellipsoid]:
        """The spleen at ``scale`` and its hilum notch."""
        semi = self.ratios * self.length * scale
        wall = self.body.wall_point(self.theta)
        center = wall - self.normal * (semi[2] * 1.15 + self.gap)
        center[2] = self.zsp
        body = _Ellipsoid(center, semi, self.axes, self.lobes)
        notch = _Ellipsoid(center - self.normal * semi[2] * self.hilum_depth * 1.0, semi * np.array([0.5, 0.45, 0.55]), self.axes)
        return body, notch

    def slab(self, sampling: Sampling) -> tuple[float, float]:
        """(lowest z, extent) of the field of view: the spleen (room for a 10% larger one) and at least 10 mm either side."""
        spleen0, _ = self.shape(1.0)
        lobe_sum = sum(abs(amp) for amp, _, _ in self.lobes)
        span = 2.0 * float(_Ellipsoid(spleen0.center, spleen0.semi, self.axes).half_extent()[2]) * 1.1 * (1 + lobe_sum / 2)
        z_extent = min(max(sampling.z_extent, span + 20.0), Z_EXTENT_MM[1])
        z_lo = self.zsp - span / 2 - 10.0 - sampling.z_slack * max(z_extent - span - 20.0, 0.0)
        return z_lo, z_extent


class Organs:
    """Every other structure, placed relative to the body and the spleen."""

    def __init__(self, rng: np.random.Generator, body: Body, spleen: Spleen):
        u = rng.uniform
        b, bx, by, ac, bc = body.b, body.bx, body.by, body.ac, body.bc
        spleen0, _ = spleen.shape(1.0)
        sp_half = spleen0.half_extent()
        zsp = spleen.zsp
        self.y_vb = y_vb = by - b + body.fat_base * 0.5 + float(u(55, 65))  # vertebral body centre
        self.vb_semi = vb_semi = (float(u(18, 23)), float(u(15, 19)))
        self.apex_l = np.array([spleen0.center[0] + 20.0, spleen0.center[1] + 10.0, zsp + sp_half[2] + float(u(2, 10))])
        self.apex_r = np.array([bx + 0.45 * ac, by, self.apex_l[2] + float(u(5, 20))])
        self.curv_l, self.curv_r = float(u(0.0015, 0.003)), float(u(0.0015, 0.003))
        self.diaphragm = float(u(3, 6))
        self.heart = (bx - float(u(0, 20)), by + float(u(0.15, 0.35)) * bc, float(u(55, 75)), float(u(45, 60)))

        self.liver_r = _Ellipsoid(
            np.array([bx + u(0.4, 0.5) * ac, by + u(-0.05, 0.15) * bc, zsp + u(5, 25)]),
            np.array([u(0.55, 0.7) * ac, u(0.7, 0.85) * bc, u(70, 95)]),
            _rot_z(u(-10, 10)),
            _lobes(rng, 3, (0.02, 0.04), (1.5, 3.0)),
        )
        self.liver_l = _Ellipsoid(
            np.array([bx - u(0.05, 0.25) * ac, by + u(0.35, 0.5) * bc, zsp + u(25, 45)]),
            np.array([u(45, 70), u(20, 30), u(35, 50)]),
            _rot_z(u(-15, 15)),
        )
        self.has_gb = bool(u() < 0.5)
        self.gallbladder = _Ellipsoid(
            np.array([bx + u(0.1, 0.3) * ac, by + u(0.25, 0.45) * bc, self.liver_r.center[2] - u(30, 50)]),
            np.array([u(12, 18), u(12, 18), u(25, 40)]),
            _rot_y(u(-20, 20)),
        )
        self.has_stomach = bool(u() < 0.75)
        self.stomach = _Ellipsoid(
            np.array([spleen0.center[0] + u(40, 65), by + u(0.1, 0.35) * bc, zsp + u(0, 30)]),
            np.array([u(35, 55), u(25, 40), u(40, 60)]),
            _rot_z(u(-30, 30)) @ _rot_y(u(-20, 20)),
            _lobes(rng, 2, (0.02, 0.05), (1.5, 3.0)),
        )
        self.stomach_level = float(u(-0.2, 0.6))
        kidney_z = zsp - float(u(35, 55))
        self.kidneys = []
        for side, dz in ((-1.0, 0.0), (1.0, -float(u(5, 20)))):
            self.kidneys.append(
                _Ellipsoid(
                    np.array([bx + side * u(55, 75), y_vb + u(0, 15), kidney_z + dz]),
                    np.array([u(22, 28), u(19, 24), u(45, 58)]),
                    _rot_z(-side * u(20, 35)) @ _rot_y(side * u(8, 18)),
                    _lobes(rng, 2, (0.02, 0.04), (1.5, 3.0)),
                )
            )
        self.medulla = float(u(0.6, 0.72))
        self.aorta = (bx - float(u(5, 20)), y_vb + vb_semi[1] + float(u(11, 16)), float(u(9, 13)))
        self.ivc = (bx + float(u(20, 30)), y_vb + vb_semi[1] + float(u(8, 15)), float(u(10, 15)), float(u(7, 11)))
        self.canal = (y_vb - vb_semi[1] - float(u(8, 11)), float(u(9, 12)), float(u(7, 9)))
        self.spinous = float(u(18, 28))
        self.transverse = float(u(25, 35))
        self.disc_period, self.disc_t, self.disc_phase = float(u(26, 32)), float(u(6, 9)), float(u(0, 32))
        self.rib_gap = float(u(5, 8))
        self.rib_drop = float(u(70, 110))
        self.rib_pitch = float(u(24, 30))
        self.rib_lowest = zsp - float(u(25, 45))
        self.rib_half = (float(u(4, 5.5)), float(u(5, 7)))  # radial, vertical half thickness
        self.bowel_thr = float(u(-0.2, 0.3))
        self.gas_thr = self.bowel_thr + float(u(1.6, 2.4))


class Anatomy:
    """Every anatomical draw of a phantom (body, spleen, the other organs), in the order drawn."""

    def __init__(self, rng: np.random.Generator):
        self.body = Body(rng)
        self.spleen = Spleen(rng, self.body)
        self.organs = Organs(rng, self.body, self.spleen)


# --------------------------------------------------------------------------------------------
# painting the draws on a grid


class _Canvas:
    """The tissue map being painted, with the 2D body layers (world x, y relative to the body centre)."""

    def __init__(self, grid: _Grid, body: Body):
        self.grid = grid
        self.X = grid.x[:, None] - np.float32(body.bx)
        self.Y = grid.y[None, :] - np.float32(body.by)
        self.r = np.hypot(self.X, self.Y)
        self.th = np.arctan2(self.Y, self.X)
        self.rb = body.r_body(self.th).astype(np.float32)
        rm = (self.rb - body.t_fat(self.th)).astype(np.float32)
        self.rc = (rm - body.t_mus(self.th)).astype(np.float32)
        nx, ny, _ = grid.shape
        self.layers = np.full((nx, ny), Tissue.AIR, np.uint8)
        self.layers[self.r < self.rb] = Tissue.FAT
        self.layers[self.r < rm] = Tissue.MUSCLE
        self.cavity = self.r < self.rc
        self.tissues = np.empty(0, np.uint8)  # the 3D map, from _trunk on
        self.organ_top = np.empty(0, np.float32)  # the diaphragm's underside, from _chest on
        self.abdomen = np.empty(0, bool)  # where organs may lie in 2D, from _footprints on

    def allowed(self, box) -> np.ndarray:
        """Inside the abdominal cavity, below the diaphragm and clear of spine and vessels, on ``box``."""
        grid = self.grid
        return self.abdomen[box[0], box[1]][:, :, None] & (grid.z[box[2]][None, None, :] < self.organ_top[box[0], box[1]][:, :, None])

    def paint(self, shape: _Ellipsoid, tissue: int, clip: bool = True) -> None:
        box = shape.box(self.grid)
        if box is None:
            return
        m = shape.inside(self.grid, box)
        if clip:
            m &= self.allowed(box)
        self.tissues[box][m] = tissue


def paint_anatomy(anatomy: Anatomy, grid: _Grid, rng: np.random.Generator, seed: int) -> np.ndarray:
    """The uint8 :class:`Tissue` map of ``anatomy`` on ``grid``; later structures win where they meet."""
    o = anatomy.organs
    c = _Canvas(grid, anatomy.body)
    _trunk(c, o, rng)
    _chest(c, anatomy.body, o)
    footprints = _footprints(c, anatomy.body, o)
    _organs(c, o)
    _spleen(c, anatomy.spleen, seed)
    _column(c, footprints)
    _ribs(c, o)
    return c.tissues


def _trunk(c: _Canvas, o: Organs, rng: np.random.Generator) -> None:
    """3D: the cavity's bowel / fat mix, the wall layers elsewhere."""
    mix = _smooth_field(rng, c.grid, float(rng.uniform(5, 8)))
    inner = np.where(mix > o.bowel_thr, np.uint8(Tissue.BOWEL), np.uint8(Tissue.FAT))
    inner[mix > o.gas_thr] = Tissue.GAS
    del mix
    c.tissues = np.where(c.cavity[:, :, None], inner, c.layers[:, :, None])


def _chest(c: _Canvas, body: Body, o: Organs) -> None:
    """The diaphragm's two domes, the lung bases and the heart above them."""
    grid, cavity = c.grid, c.cavity
    apex_l, apex_r, curv_l, curv_r, heart = o.apex_l, o.apex_r, o.curv_l, o.curv_r, o.heart
    Xw = grid.x[:, None].astype(np.float64)
    Yw = grid.y[None, :].astype(np.float64)
    dome = np.maximum(
        apex_l[2] - curv_l * ((Xw - apex_l[0]) ** 2 + (Yw - apex_l[1]) ** 2),
        apex_r[2] - curv_r * ((Xw - apex_r[0]) ** 2 + (Yw - apex_r[1]) ** 2),
    ).astype(np.float32)
    c.organ_top = dome - np.float32(o.diaphragm)  # abdominal organs stay below the diaphragm
    k0 = int(np.searchsorted(grid.z, float(c.organ_top[cavity].min()) if cavity.any() else np.inf))
    if k0 < grid.shape[2]:
        zz = grid.z[None, None, k0:]
        above = cavity[:, :, None] & (zz > dome[:, :, None])
        band = cavity[:, :, None] & (zz > c.organ_top[:, :, None]) & ~above
        heart2d = ((c.X - (heart[0] - body.bx)) / heart[2]) ** 2 + ((c.Y - (heart[1] - body.by)) / heart[3]) ** 2 < 1.0
        sub = c.tissues[:, :, k0:]
        sub[band] = Tissue.MUSCLE
        sub[above & heart2d[:, :, None]] = Tissue.HEART
        sub[above & ~heart2d[:, :, None]] = Tissue.LUNG
        del above, band


def _footprints(c: _Canvas, body: Body, o: Organs) -> dict[str, np.ndarray]:
    """2D footprints of the structures that run through the whole slab: vertebral column, vessels."""
    X, Y, by = c.X, c.Y, body.by
    canal, aorta, ivc = o.canal, o.aorta, o.ivc
    zdisc = np.mod(c.grid.z - np.float32(o.disc_phase), np.float32(o.disc_period)) < o.disc_t
    vb = ((X) / o.vb_semi[0]) ** 2 + ((Y - (o.y_vb - by)) / o.vb_semi[1]) ** 2
    vb_in, vb_core = vb < 1.0, vb < 0.72
    cy_rel = canal[0] - by
    can = (X / canal[1]) ** 2 + ((Y - cy_rel) / canal[2]) ** 2
    arch = (X / (canal[1] + 6.0)) ** 2 + ((Y - cy_rel) / (canal[2] + 6.0)) ** 2 < 1.0
    arch |= (np.abs(X) < 3.5) & (Y < cy_rel) & (Y > cy_rel - canal[2] - o.spinous)
    arch |= (np.abs(Y - cy_rel) < 3.0) & (np.abs(X) < o.transverse)
    arch &= ~(can < 1.0) & (c.r < c.rb)
    ao2d = (X - (aorta[0] - body.bx)) ** 2 + (Y - (aorta[1] - by)) ** 2 < aorta[2] ** 2
    ivc2d = ((X - (ivc[0] - body.bx)) / ivc[2]) ** 2 + ((Y - (ivc[1] - by)) / ivc[3]) ** 2 < 1.0
    # organs keep a fat plane of ~3 mm from the spine and the aorta (the IVC runs through the liver)
    keepout = ndimage.distance_transform_edt(~(vb_in | arch | (can < 1.0) | ao2d), sampling=c.grid.spacing[:2]) < 3.0
    c.abdomen = c.cavity & ~keepout
    return {"zdisc": zdisc, "vb_in": vb_in, "vb_core": vb_core, "canal": can < 1.0, "arch": arch,
            "aorta": ao2d, "ivc": ivc2d}


def _organs(c: _Canvas, o: Organs) -> None:
    """Liver, gallbladder, stomach and kidneys, back to front."""
    grid, tissues = c.grid, c.tissues
    c.paint(o.liver_r, Tissue.LIVER)
    c.paint(o.liver_l, Tissue.LIVER)
    if o.has_gb:
        c.paint(o.gallbladder, Tissue.GALLBLADDER)
    if o.has_stomach:
        stomach = o.stomach
        box = stomach.box(grid)
        if box is not None:
            uu = stomach.local(grid, box)
            outer = stomach.inside(grid, box, uu) & c.allowed(box)
            inner_m = stomach.scaled(1.0 - 5.0 / float(stomach.semi.min())).inside(grid, box) & outer
            level = np.float32(stomach.center[1] + o.stomach_level * stomach.semi[1])
            gas = inner_m & (grid.y[box[1]][None, :, None] > level)
            view = tissues[box]
            view[outer] = Tissue.STOMACH_WALL
            view[inner_m] = Tissue.STOMACH_CONTENT
            view[gas] = Tissue.GAS
    for kid in o.kidneys:
        c.paint(kid.scaled(1.3), Tissue.FAT)  # perirenal fat
        box = kid.box(grid)
        if box is not None:
            uu = kid.local(grid, box)
            m = kid.inside(grid, box, uu) & c.allowed(box)
            rho2 = uu[0] ** 2 + uu[1] ** 2 + uu[2] ** 2
            view = tissues[box]
            view[m] = Tissue.KIDNEY_CORTEX
            view[m & (rho2 < o.medulla**2)] = Tissue.KIDNEY_MEDULLA


def _spleen(c: _Canvas, spleen: Spleen, seed: int) -> None:
    """The spleen, rescaled until its voxel volume lies in :data:`SPLEEN_VOLUME_ML`."""
    grid = c.grid
    lo_ml, hi_ml = SPLEEN_VOLUME_ML[0] * 1.05, SPLEEN_VOLUME_ML[1] * 0.95
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    scale = 1.0
    for _ in range(6):
        body_s, notch = spleen.shape(scale)
        box = body_s.box(grid)
        if box is None:
            raise DataError(f"phantom {seed}: the spleen lies outside the field of view")
        m = body_s.inside(grid, box) & ~notch.inside(grid, box) & c.allowed(box)
        ml = float(m.sum()) * voxel_ml
        if lo_ml <= ml <= hi_ml:
            break
        target = min(max(spleen.volume_ml, lo_ml * 1.05), hi_ml * 0.95)
        scale *= (target / max(ml, 1e-3)) ** (1.0 / 3.0)
    c.tissues[box][m] = Tissue.SPLEEN


def _column(c: _Canvas, fp: dict[str, np.ndarray]) -> None:
    """Vessels (cylinders along z through the whole slab: they cross the diaphragm) and the vertebral column."""
    tissues, zdisc = c.tissues, fp["zdisc"]
    tissues[fp["ivc"]] = Tissue.IVC
    tissues[fp["aorta"]] = Tissue.AORTA
    # vertebral column: body (cortex, cancellous, discs), canal, posterior arch, processes
    body_col = np.where(zdisc, np.uint8(Tissue.DISC), np.uint8(Tissue.BONE_CORTEX))
    core_col = np.where(zdisc, np.uint8(Tissue.DISC), np.uint8(Tissue.BONE_CANCELLOUS))
    tissues[fp["arch"]] = Tissue.BONE_CORTEX
    ix, iy = np.nonzero(fp["vb_in"] & ~fp["vb_core"])
    tissues[ix, iy, :] = body_col[None, :]
    ix, iy = np.nonzero(fp["vb_core"])
    tissues[ix, iy, :] = core_col[None, :]
    tissues[fp["canal"]] = Tissue.SPINAL_CANAL


def _ribs(c: _Canvas, o: Organs) -> None:
    """Ribs: arcs just outside the cavity, falling from back to front, both sides."""
    grid, tissues, rib_half = c.grid, c.tissues, o.rib_half
    phi = _phi_post(c.th)
    r_rib = c.rc + np.float32(o.rib_gap)
    radial = (c.r - r_rib) / np.float32(rib_half[0])
    ring = (np.abs(radial) < 1.0) & (phi > np.deg2rad(18)) & (phi < np.deg2rad(145)) & (c.r < c.rb)
    rx, ry = np.nonzero(ring)
    if not rx.size:
        return
    phi_p = phi[rx, ry].astype(np.float32)
    half_h = np.float32(rib_half[1]) * np.sqrt(np.maximum(0.0, 1.0 - radial[rx, ry] ** 2)).astype(np.float32)
    z_top = float(grid.z[-1])
    k = 0
    while True:
        z0 = o.rib_lowest + k * o.rib_pitch
        zc = np.float32(z0) - np.float32(o.rib_drop) * (phi_p / np.float32(np.pi)) ** 1.2
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
