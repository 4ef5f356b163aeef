"""Reading NIfTI safely: every bad file gets one clear DataError."""


import nibabel as nib
import numpy as np
import pytest

from spleen_utils.errors import DataError
from spleen_utils.io import load_nifti, save_mask


def _img(tmp_path, arr, name="x.nii.gz", affine=None, slope=None):
    img = nib.Nifti1Image(arr, np.diag([0.7, 0.7, 3.0, 1.0]) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, -1024)
    p = tmp_path / name
    nib.save(img, str(p))
    return p


def test_reads_int_with_slope(tmp_path):
    p = _img(tmp_path, np.arange(24, dtype=np.int16).reshape(2, 3, 4), slope=2.0)
    v = load_nifti(p)
    assert v.array.dtype == np.float32 and v.shape == (2, 3, 4)
    assert v.array[0, 0, 1] == pytest.approx(2.0 - 1024)
    assert v.spacing == pytest.approx((0.7, 0.7, 3.0))


def test_trailing_singleton_is_3d(tmp_path):
    p = _img(tmp_path, np.zeros((4, 5, 6, 1), np.int16))
    assert load_nifti(p).shape == (4, 5, 6)


@pytest.mark.parametrize("shape,dims", [((8, 8), "2D"), ((4, 4, 4, 3), "4D")])
def test_wrong_dimensionality(tmp_path, shape, dims):
    p = _img(tmp_path, np.zeros(shape, np.int16))
    with pytest.raises(DataError, match=dims):
        load_nifti(p)


def test_missing_not_nifti_truncated(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_nifti(tmp_path / "nope.nii.gz")
    txt = tmp_path / "text.nii.gz"
    txt.write_text("hello, I am not a NIfTI")
    with pytest.raises(DataError, match="not a NIfTI|corrupt"):
        load_nifti(txt)
    good = _img(tmp_path, np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16))
    data = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated|corrupt"):
        load_nifti(cut)


def test_nan_and_rgb_rejected(tmp_path):
    a = np.zeros((4, 4, 4), np.float32)
    a[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        load_nifti(_img(tmp_path, a))
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(DataError, match="voxel type"):
        load_nifti(_img(tmp_path, rgb, name="rgb.nii"))


def test_save_mask_keeps_grid_and_is_atomic(tmp_path):
    aff = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 50], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    p = _img(tmp_path, np.zeros((6, 7, 8), np.int16), affine=aff)
    ref = load_nifti(p)
    out = save_mask(np.ones(ref.shape, np.uint8), ref, tmp_path / "sub" / "m.nii.gz")
    back = nib.load(str(out))
    assert back.shape == (6, 7, 8) and np.allclose(back.affine, aff) and back.get_data_dtype() == np.uint8
    assert [f.name for f in out.parent.iterdir()] == ["m.nii.gz"]  # no temporary left behind
    with pytest.raises(ValueError):
        save_mask(np.ones((2, 2, 2), np.uint8), ref, tmp_path / "bad.nii.gz")
