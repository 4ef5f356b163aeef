"""Randomised CT appearance: the painter, its training transform, and anatomy from real label maps."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from spleen_utils import appearance as ap
from spleen_utils import labelmaps
from spleen_utils.errors import DataError
from spleen_utils.samples import label_map
from spleen_utils.transforms import RandCTAppearanced


def _tissues(shape=(24, 24, 16)):
    t = np.full(shape, ap.FAT, np.uint8)
    t[4:12, 4:20, 2:14] = ap.SPLEEN
    t[12:22, 4:20, 2:14] = ap.LIVER
    return t


def test_appearance_is_deterministic_per_seed_and_spans_phases():
    a = ap.draw_appearance(np.random.default_rng(3))
    b = ap.draw_appearance(np.random.default_rng(3))
    assert a["phase"] == b["phase"] and np.array_equal(a["mean"], b["mean"])
    phases = {ap.draw_appearance(np.random.default_rng(s))["phase"] for s in range(200)}
    assert phases == set(ap.PHASES) | {"wild"}
    # the spleen's mean HU covers non-contrast (~40 HU) to bright portal-venous/arterial (>150 HU)
    spleen = [ap.draw_appearance(np.random.default_rng(s), wild=0.0)["mean"][ap.SPLEEN] for s in range(300)]
    assert min(spleen) < 50 and max(spleen) > 150


def test_paint_uses_each_tissues_mean():
    t = _tissues()
    rng = np.random.default_rng(0)
    a = ap.draw_appearance(np.random.default_rng(1), wild=0.0)
    a.update(noise=0.0, drift=0.0, blur_mm=(0.0, 0.0), spleen_mottle=0.0, thick_mm=0.0)
    hu = ap.paint(t, (2.0, 2.0, 2.0), rng, appearance=a)
    assert hu.dtype == np.float32 and hu.shape == t.shape
    for tissue in (ap.SPLEEN, ap.LIVER, ap.FAT):
        assert abs(float(np.median(hu[t == tissue])) - float(a["mean"][tissue])) < 3 * float(a["texture"][tissue]) + 1
    again = ap.paint(t, (2.0, 2.0, 2.0), np.random.default_rng(0), appearance=a)
    assert np.array_equal(hu, again)


def test_thick_slices_are_blocks_along_z():
    t = _tissues()
    a = ap.draw_appearance(np.random.default_rng(1))
    a.update(thick_mm=8.0)  # 4 slices of 2 mm
    hu = ap.paint(t, (2.0, 2.0, 2.0), np.random.default_rng(0), appearance=a)
    blocks = hu[:, :, :16].reshape(24, 24, 4, 4)
    assert np.allclose(blocks, blocks[..., :1], atol=1e-3)
    assert not np.allclose(hu[:, :, 0], hu[:, :, 4])


def test_rand_ct_appearance_repaints_crops_with_tissue_maps_only():
    t = torch.from_numpy(_tissues()[None].astype(np.float32))
    image = MetaTensor(torch.zeros((1, 24, 24, 16)), affine=torch.eye(4))
    xf = RandCTAppearanced((-57, 164), (3.0, 3.0, 4.0), prob=1.0)
    xf.set_random_state(0)
    out = xf({"image": image, "tissue": t, "label": t})
    assert "tissue" not in out
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == image.shape
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert float(out["image"].std()) > 0.01  # painted, not the zeros it got
    real = xf({"image": image, "label": t})  # a real scan: unchanged
    assert torch.equal(real["image"], image)
    never = RandCTAppearanced((-57, 164), (3.0, 3.0, 4.0), prob=0.0)({"image": image, "tissue": t})
    assert torch.equal(never["image"], image) and "tissue" not in never


def test_tissue_lut_maps_totalsegmentator_and_amos_classes():
    lut = labelmaps.tissue_lut({1: "spleen", 2: "kidney_right", 23: "kidney_cyst_left", 31: "vertebrae_L1", 99: "something_new"}, "totalseg")
    assert lut[1] == ap.SPLEEN and lut[2] == ap.KIDNEY_CORTEX and lut[23] == ap.GALLBLADDER
    assert lut[31] == ap.BONE_CANCELLOUS and lut[99] == ap.SOFT and lut[0] == labelmaps._UNLABELLED
    amos = labelmaps.tissue_lut({1: "spleen", 6: "liver", 14: "bladder"}, "amos")
    assert amos[1] == ap.SPLEEN and amos[6] == ap.LIVER and amos[14] == ap.BLADDER


@pytest.fixture(scope="module")
def anatomy():
    m = label_map("totalseg_ct_3mm_organs")
    return labelmaps.resample_nearest(labelmaps.load_anatomy(m.path, m.labels, m.scheme, m.name), spacing_mm=3.0)


def test_label_map_case_keeps_real_anatomy_and_is_deterministic(anatomy):
    a = labelmaps.make_case(anatomy, 7)
    b = labelmaps.make_case(anatomy, 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8 and a.image.shape == a.label.shape == a.tissues.shape
    assert np.array_equal(a.label, (a.tissues == ap.SPLEEN).astype(np.uint8))
    assert 30 < a.params["spleen_ml"] < 1200
    # world coordinates: the spleen lies on the patient's left (RAS: smaller x) of the liver
    def centroid_x(mask):
        ijk = np.argwhere(mask).mean(axis=0)
        return float((a.affine @ np.r_[ijk, 1.0])[0])
    assert centroid_x(a.tissues == ap.SPLEEN) < centroid_x(a.tissues == ap.LIVER) - 50
    c = labelmaps.make_case(anatomy, 8)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_what_an_anatomy_remembers_does_not_change_its_cases(anatomy):
    """The hull and depth maps kept after the first case give the cases a fresh anatomy gives."""
    warm = labelmaps.Anatomy(anatomy.tissues, anatomy.affine, anatomy.name)
    labelmaps.make_case(warm, 3)  # fills the memo
    assert {"hull_distance", f"depth:{ap.BONE_CANCELLOUS}"} <= set(warm.memo)
    for seed in (4, 5):
        fresh = labelmaps.Anatomy(anatomy.tissues.copy(), anatomy.affine, anatomy.name)
        a, b = labelmaps.make_case(warm, seed), labelmaps.make_case(fresh, seed)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.tissues, b.tissues)


def test_label_map_without_spleen_is_refused(tmp_path):
    import nibabel as nib

    path = tmp_path / "nospleen.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 5, np.uint8), np.eye(4)), path)
    with pytest.raises(DataError, match="no spleen"):
        labelmaps.load_anatomy(path, {5: "liver"}, "totalseg")
