"""Reading NIfTI safely: every bad file gets one clear DataError."""


import gzip
import re

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


# ----------------------------------------------------------------------------------------------
# hostile headers (issue #9): refused with one sentence, in bounded memory, before nibabel parses them

from hostile_corpus import BLOAT_BYTES, hostile_corpus, measure, nifti1_bytes, extension, ct_block  # noqa: E402

from spleen_utils.io import MAX_EXTENSION_BYTES, NiftiHeaderError, check_nifti_file  # noqa: E402

#: the most a refusal may allocate (tracemalloc's peak): the extension cap and the voxels of a
#: 16^3 image, not the 64 MiB of zeros behind them
REFUSAL_PEAK_BYTES = MAX_EXTENSION_BYTES + (4 << 20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return {c.name: c for c in hostile_corpus(tmp_path_factory.mktemp("hostile"), geometry=False)}


@pytest.mark.parametrize("name", [
    "ext_size_7", "ext_size_negative", "ext_size_24", "ext_size_beyond_file", "ext_size_beyond_vox_offset",
    "ext_over_cap", "ext_flag_offset_0", "ext_truncated", "bad_datatype", "negative_vox_offset", "nan_vox_offset",
    "vox_offset_inside_header", "vox_offset_beyond_file", "negative_dim", "dim0_9", "nan_sform", "bad_magic",
    "truncated_header", "truncated_voxels", "truncated_gzip", "nifti2_ext_size_7", "nifti2_bad_datatype",
])
def test_hostile_header_is_refused_with_one_sentence_in_bounded_memory(corpus, name):
    case = corpus[name]
    seconds, peak, err = measure(lambda: load_nifti(case.path))
    print(f"{name}: refused in {seconds * 1000:.1f} ms, peak {peak / 2**20:.2f} MiB traced")
    assert isinstance(err, DataError), f"{name}: {type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg and msg.startswith(str(case.path)) and msg.endswith("."), msg
    assert re.search(case.match, msg), msg
    assert peak < REFUSAL_PEAK_BYTES, f"{name}: {peak / 2**20:.1f} MiB allocated to refuse it"


def test_header_guard_reads_only_the_header_of_a_gzip_stream(tmp_path):
    """A .nii.gz whose extension table is fine but whose voxels are 64 MiB of zeros: the guard
    inflates the header bytes only."""
    good = tmp_path / "big.nii.gz"
    good.write_bytes(gzip.compress(nifti1_bytes(ct_block(), ext=extension(32)) + b"\0" * BLOAT_BYTES))
    seconds, peak, err = measure(lambda: check_nifti_file(good))
    assert err is None and peak < (1 << 20), (err, peak)


def test_valid_extensions_still_load(tmp_path):
    img = nib.Nifti1Image(ct_block(), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment that nibabel pads to 16 bytes"))
    for name in ("ext.nii", "ext.nii.gz"):
        nib.save(img, str(tmp_path / name))
        assert check_nifti_file(tmp_path / name) == "nifti1"
        assert load_nifti(tmp_path / name).shape == (16, 16, 16)
    nib.save(nib.Nifti2Image(ct_block(), np.eye(4)), str(tmp_path / "two.nii.gz"))
    assert check_nifti_file(tmp_path / "two.nii.gz") == "nifti2"
    assert load_nifti(tmp_path / "two.nii.gz").shape == (16, 16, 16)


def test_guard_kinds_for_the_service(corpus, tmp_path):
    """The service maps these kinds to its error codes (not_nifti, corrupt_nifti, bad_header)."""
    kinds = {}
    for name in ("bad_magic", "truncated_header", "ext_size_7", "bad_datatype"):
        with pytest.raises(NiftiHeaderError) as e:
            check_nifti_file(corpus[name].path, "upload")
        kinds[name] = e.value.kind
        assert str(e.value).startswith("upload: ")
    assert kinds == {"bad_magic": "not_nifti", "truncated_header": "corrupt_nifti", "ext_size_7": "bad_header",
                     "bad_datatype": "bad_header"}
    text = tmp_path / "t.nii"
    text.write_text("hello")
    with pytest.raises(NiftiHeaderError) as e:
        check_nifti_file(text)
    assert e.value.kind == "not_nifti"


def test_nibabel_header_errors_become_data_errors(tmp_path, monkeypatch):
    """Whatever nibabel's own checks refuse (HeaderDataError) is a DataError, not a traceback."""
    p = _img(tmp_path, np.zeros((4, 4, 4), np.int16))

    def boom(*a, **k):
        raise nib.spatialimages.HeaderDataError("vox offset 17 too low for single file nifti1")

    monkeypatch.setattr(nib, "load", boom)
    with pytest.raises(DataError, match="header is invalid"):
        load_nifti(p)


def test_atomic_writes_fsync_before_the_rename(tmp_path, monkeypatch):
    """save_nifti (atomic_path) flushes the temporary file to disk before renaming it into place."""
    import os

    import spleen_utils.io as sio

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd here to name the file an fsync flushes")

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(sio.os, "fsync", fsync)
    monkeypatch.setattr(sio.os, "replace", replace)
    ref = load_nifti(_img(tmp_path, np.zeros((6, 7, 8), np.int16)))
    out = save_mask(np.ones(ref.shape, np.uint8), ref, tmp_path / "m.nii.gz")
    kinds = [k for k, _ in events]
    assert "replace" in kinds and "fsync" in kinds[: kinds.index("replace")], events
    tmp = events[kinds.index("replace")][1]
    assert any(k == "fsync" and str(v) == tmp for k, v in events[: kinds.index("replace")]), events
    assert nib.load(str(out)).shape == (6, 7, 8)


def test_temp_files_get_the_umask_without_touching_it(tmp_path, monkeypatch):
    """The service writes from worker threads: the umask is read once, never flipped (#9)."""
    import os

    from spleen_utils import io as sio

    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o022)
    tmp = sio.temp_beside(tmp_path / "mask.nii.gz")
    assert calls == []
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~sio._UMASK
    assert sio._process_umask() == sio._UMASK  # /proc/self/status agrees with what was read at import
