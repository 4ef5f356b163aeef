"""Metrics against cases with a known answer."""

import json

import nibabel as nib
import numpy as np
import pytest

from spleen_utils.errors import DataError
from spleen_utils.metrics import dice, evaluate, hd95, volume_ml


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_known_overlap():
    a = cube((20, 20, 20), (0, 0, 0), (10, 10, 10))
    b = cube((20, 20, 20), (5, 0, 0), (15, 10, 10))  # half of each overlaps
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0


def test_dice_empty_rules():
    z = np.zeros((5, 5, 5), bool)
    assert dice(z, z) == 1.0
    assert dice(z, cube((5, 5, 5), (1, 1, 1), (3, 3, 3))) == 0.0


def test_hd95_two_slabs_known_distance_anisotropic():
    # two one-voxel-thick slabs 4 slices apart: every surface point is 4 * 2.5 mm from the other
    a = cube((12, 12, 20), (2, 2, 5), (10, 10, 6))
    b = cube((12, 12, 20), (2, 2, 9), (10, 10, 10))
    assert hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(10.0, abs=1e-4)
    assert hd95(a, b, (0.7, 0.7, 1.0)) == pytest.approx(4.0, abs=1e-4)


def test_hd95_cubes_shifted_in_plane_uses_spacing():
    a = cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = cube((30, 30, 30), (8, 5, 5), (18, 15, 15))  # shifted 3 voxels along x
    d1 = hd95(a, b, (1.0, 1.0, 1.0))
    d2 = hd95(a, b, (2.0, 1.0, 1.0))
    assert 0 < d1 <= 3.0 + 1e-6
    assert d2 == pytest.approx(2 * d1, rel=1e-6)
    assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0


def test_hd95_empty_rules():
    z = np.zeros((8, 8, 8), bool)
    c = cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    assert hd95(z, z, (1, 1, 1)) == 0.0
    assert hd95(c, z, (1, 1, 1)) is None
    assert hd95(z, c, (1, 1, 1)) is None


def test_volume_ml():
    assert volume_ml(np.ones((10, 10, 10)), (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert volume_ml(np.ones((10, 10, 10)), (2.0, 1.0, 0.5)) == pytest.approx(1.0)


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


def test_evaluate_folders_and_json(tmp_path):
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    (tmp_path / "pred").mkdir()
    (tmp_path / "lab").mkdir()
    a = cube((20, 20, 10), (2, 2, 2), (12, 12, 6))
    _write(tmp_path / "pred" / "c1.nii.gz", a, aff)
    _write(tmp_path / "lab" / "c1.nii.gz", a, aff)
    _write(tmp_path / "pred" / "c2.nii.gz", np.zeros_like(a), aff)
    _write(tmp_path / "lab" / "c2.nii.gz", a, aff)
    res = evaluate(tmp_path / "pred", tmp_path / "lab", tmp_path / "out.json")
    on_disk = json.loads((tmp_path / "out.json").read_text())
    assert on_disk == res
    by = {c["name"]: c for c in res["cases"]}
    assert by["c1"]["dice"] == 1.0 and by["c1"]["hd95_mm"] == 0.0
    assert by["c1"]["label_ml"] == pytest.approx(a.sum() * 0.8 * 0.8 * 2.0 / 1000)
    assert by["c2"]["dice"] == 0.0 and by["c2"]["hd95_mm"] is None and by["c2"]["pred_ml"] == 0.0
    assert res["mean_dice"] == pytest.approx(0.5)
    assert res["mean_hd95_mm"] == 0.0 and res["hd95_cases"] == 1


def test_evaluate_grid_mismatch_is_clear(tmp_path):
    a = cube((20, 20, 10), (2, 2, 2), (12, 12, 6))
    _write(tmp_path / "p.nii.gz", a, np.eye(4))
    _write(tmp_path / "l.nii.gz", a, np.diag([-1, -1, 1, 1]))
    with pytest.raises(DataError, match="does not match"):
        evaluate(tmp_path / "p.nii.gz", tmp_path / "l.nii.gz")
