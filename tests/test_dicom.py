"""DICOM in, DICOM out: generated series (written here with pydicom) -> volume -> NIfTI, mask -> SEG.

Each series is written from a known volume and RAS affine, so the reader's voxels and world
geometry can be compared with the truth whichever way the slices were stored (RAS, LPS, a
permuted and an oblique orientation), named (shuffled, no extension) or numbered.
"""

from __future__ import annotations

import random
import stat
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the optional 'dicom' extra is not installed (pip install -e '.[dicom]')")
hd = pytest.importorskip("highdicom", reason="the optional 'dicom' extra is not installed (pip install -e '.[dicom]')")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from spleen_utils import cli  # noqa: E402
from spleen_utils.dicom import convert, is_dicom_input, read_seg, read_series, write_seg  # noqa: E402
from spleen_utils.errors import DataError  # noqa: E402

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    """Whole-number HU with a position-sensitive pattern (no symmetry hides a flip)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    a[0, 0, 0] = -1024
    return a


def affine_for(kind: str, spacing=(0.8, 0.9, 2.5)) -> np.ndarray:
    sx, sy, sz = spacing
    if kind == "RAS":
        m = np.diag([sx, sy, sz])
    elif kind == "LPS":
        m = np.diag([-sx, -sy, sz])
    elif kind == "permuted":  # array x along S, y along R, z along -A (a coronal-like stack)
        m = np.array([[0, sy, 0], [0, 0, -sz], [sx, 0, 0]], dtype=float)
    elif kind == "oblique":  # rotated 20 degrees about one axis and 10 about another
        a, b = np.radians(20), np.radians(10)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        m = rz @ rx @ np.diag([sx, sy, sz])
    else:
        raise ValueError(kind)
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = (-31.5, 17.25, -102.0)
    return aff


def write_series(folder: Path, array: np.ndarray, affine: np.ndarray, *, names="ordered", ext=".dcm", uids=True,
                 slope=1.0, intercept=-1024.0, drop=None, tilt_mm=0.0, series_uid=None, study_uid=None,
                 instance_numbers="reversed", description="generated CT", seed=0, compress=None, ipp_decimals=6) -> dict:
    """Write ``array`` (x, y, z; RAS ``affine``) as single-frame CT slices: slice k = array[:, :, k],
    rows along y, columns along x. Returns the UIDs used."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lps = RAS_TO_LPS @ affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    r, c = lps[:3, 0] / sx, lps[:3, 1] / sy
    series_uid = series_uid if series_uid is not None else (generate_uid() if uids else "")
    study_uid = study_uid if study_uid is not None else (generate_uid() if uids else "")
    for_uid = generate_uid() if uids else ""
    nz = array.shape[2]
    ks = [k for k in range(nz) if k != drop]
    numbers = list(range(1, len(ks) + 1))
    if instance_numbers == "reversed":
        numbers = numbers[::-1]
    file_names = [f"IM{i:04d}" for i in range(len(ks))]
    if names == "shuffled":
        rng.shuffle(file_names)
    written = []
    for idx, k in enumerate(ks):
        sop = generate_uid() if uids else ""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop or "1.2.3"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Spleen", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "CT", 3, numbers[idx], description
        ds.Manufacturer, ds.PositionReferenceIndicator = "test", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        pos = lps @ np.array([0, 0, k, 1.0])
        pos = pos[:3] + c * tilt_mm * k  # a tilted gantry: slice origins drift down the columns
        ds.ImagePositionPatient = [f"{v:.{ipp_decimals}f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (along y), column spacing (along x)
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.4f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        stored = np.round((array[:, :, k].T - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if compress is not None:
            ds.compress(compress)
        path = folder / f"{file_names[idx]}{ext}"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return {"series": series_uid, "study": study_uid, "frame": for_uid, "files": written}


def same_world(array, affine, got_array, got_affine):
    """Whether two volumes hold the same voxels at the same world positions (any axis order)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.io_orientation(got_affine))
    moved = nib.orientations.apply_orientation(array, ornt)
    moved_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return moved.shape == got_array.shape and np.array_equal(moved, got_array), np.abs(moved_affine - got_affine).max()


@pytest.mark.parametrize("kind", ["RAS", "LPS", "permuted", "oblique"])
def test_nifti_to_series_to_nifti_keeps_voxels_and_geometry(tmp_path, kind):
    array, affine = volume(), affine_for(kind)
    src = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.int16), affine), str(src))
    write_series(tmp_path / "series", array, affine, names="shuffled")
    assert is_dicom_input(tmp_path / "series")
    assert cli.main(["convert", "--input", str(tmp_path / "series"), "--output", str(tmp_path / "ct.nii.gz")]) == 0
    out = nib.load(str(tmp_path / "ct.nii.gz"))
    orig = nib.load(str(src))
    equal, err = same_world(np.asarray(orig.dataobj), orig.affine, np.asarray(out.dataobj), out.affine)
    assert equal
    assert err < 1e-4, f"world geometry off by {err} mm"
    assert out.get_data_dtype() == np.int16  # whole HU stay int16
    # rows and columns keep their stored directions; slices run along row x column (the normal)
    assert nib.aff2axcodes(out.affine)[:2] == nib.aff2axcodes(affine)[:2]
    normal = np.cross(out.affine[:3, 0], out.affine[:3, 1])
    assert normal @ out.affine[:3, 2] > 0


def test_order_comes_from_positions_not_names_or_numbers(tmp_path):
    array, affine = volume(seed=1), affine_for("RAS")
    info = write_series(tmp_path / "s", array, affine, names="shuffled", ext="", instance_numbers="reversed", seed=3)
    assert all(p.suffix == "" for p in info["files"])  # no .dcm extension
    dv = read_series(tmp_path / "s")
    assert np.array_equal(dv.volume.array, array)
    assert np.allclose(dv.volume.affine, affine, atol=1e-5)
    assert dv.series.uid == info["series"]


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "JPEGLSLossless", "RLELossless"])
def test_compressed_series(tmp_path, syntax):
    uid = getattr(pydicom.uid, syntax)
    array, affine = volume(shape=(40, 36, 4), seed=11), affine_for("LPS")  # JPEG 2000 wants >= 32 pixels a side
    info = write_series(tmp_path / "s", array, affine, compress=uid, names="shuffled")
    assert pydicom.dcmread(info["files"][0]).file_meta.TransferSyntaxUID == uid
    got = read_series(tmp_path / "s").volume
    assert np.array_equal(got.array, array)


def test_decoders_of_the_dicom_extra_are_installed():
    """JPEG 2000 (pylibjpeg-openjpeg), JPEG-LS and lossless JPEG (pylibjpeg-libjpeg) decode."""
    from pydicom.pixels import get_decoder

    for name in ("JPEG2000Lossless", "JPEG2000", "JPEGLSLossless", "JPEGLSNearLossless", "JPEGLosslessSV1", "JPEGLossless"):
        decoder = get_decoder(getattr(pydicom.uid, name))
        assert decoder.is_available, name
        assert "pylibjpeg" in decoder.available_plugins, name


def test_rescale_slope_intercept_applied(tmp_path):
    array = np.round(volume(seed=2) / 2) * 2  # representable with slope 2
    write_series(tmp_path / "s", array, affine_for("LPS"), slope=2.0, intercept=-1000.0)
    got = read_series(tmp_path / "s").volume
    assert np.array_equal(got.array, array)


def test_anonymised_series_with_empty_uids(tmp_path):
    array, affine = volume(seed=4), affine_for("RAS")
    write_series(tmp_path / "s", array, affine, uids=False, names="shuffled")
    dv = read_series(tmp_path / "s")
    assert dv.series.key == "no-uid-1"
    assert np.array_equal(dv.volume.array, array)
    assert set(dv.missing_uids) == {"StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"}
    with pytest.raises(DataError, match="anonymised"):
        write_seg(np.zeros(array.shape, np.uint8), dv, tmp_path / "seg.dcm")
    # the label works as a --series-uid
    assert read_series(tmp_path / "s", series_uid="no-uid-1").volume.shape == array.shape


def test_several_series_need_a_choice(tmp_path):
    a, b = volume(seed=5), volume(shape=(12, 10, 6), seed=6)
    ia = write_series(tmp_path / "mix", a, affine_for("RAS"), description="arterial")
    ib = write_series(tmp_path / "mix" / "sub", b, affine_for("LPS"), description="venous", series_uid=generate_uid())
    with pytest.raises(DataError) as e:
        read_series(tmp_path / "mix")
    msg = str(e.value)
    assert ia["series"] in msg and ib["series"] in msg and "--series-uid" in msg and "arterial" in msg
    assert msg.count(".") >= 1 and "\n" not in msg
    got = read_series(tmp_path / "mix", series_uid=ib["series"]).volume
    assert np.array_equal(got.array, b)
    with pytest.raises(DataError, match="no series"):
        read_series(tmp_path / "mix", series_uid="1.2.3.4")
    # the CLI: exit 2 and one sentence
    assert cli.main(["convert", "--input", str(tmp_path / "mix"), "--output", str(tmp_path / "x.nii.gz")]) == 2


def test_uneven_spacing_is_refused(tmp_path):
    write_series(tmp_path / "s", volume(), affine_for("RAS"), drop=4)
    with pytest.raises(DataError, match="uneven slice spacing"):
        read_series(tmp_path / "s")


@pytest.mark.parametrize("tilt_mm", [0.5, 0.1])
def test_gantry_tilt_is_refused(tmp_path, tilt_mm):
    """0.5 mm per 2.5 mm slice is 11 degrees; 0.1 mm is 2.3 degrees and 0.7 mm (most of a pixel) by the last slice."""
    write_series(tmp_path / "s", volume(), affine_for("RAS"), tilt_mm=tilt_mm)
    with pytest.raises(DataError, match="gantry tilt"):
        read_series(tmp_path / "s")


def test_positions_rounded_by_the_scanner_are_accepted(tmp_path):
    """ImagePositionPatient with two decimals (as some scanners write it): not uneven, not tilted, and
    the affine stays orthogonal (so the fast prediction path, not the sheared one, takes it)."""
    array, affine = volume(), affine_for("RAS", spacing=(0.7, 0.7, 0.625))
    affine[:3, 3] = (-12.3456, 7.891, 3.3333)
    write_series(tmp_path / "s", array, affine, ipp_decimals=2)
    got = read_series(tmp_path / "s").volume
    assert np.array_equal(got.array, array)
    m = got.affine[:3, :3]
    assert np.allclose(m.T @ m, np.diag(np.diag(m.T @ m)), atol=1e-9)
    assert np.allclose(got.affine, affine, atol=0.01)


def test_duplicate_positions_are_refused(tmp_path):
    info = write_series(tmp_path / "s", volume(), affine_for("RAS"))
    extra = pydicom.dcmread(info["files"][2])
    extra.SOPInstanceUID = generate_uid()
    extra.save_as(tmp_path / "s" / "copy.dcm")
    with pytest.raises(DataError, match="share the position"):
        read_series(tmp_path / "s")


def test_load_image_takes_nifti_or_series(tmp_path):
    from spleen_utils.dicom import load_image

    array, affine = volume(seed=13), affine_for("LPS")
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "ct.nii.gz"))
    write_series(tmp_path / "s", array, affine)
    a, b = load_image(tmp_path / "ct.nii.gz"), load_image(tmp_path / "s")
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine, atol=1e-5)


def test_broken_geometry_is_one_sentence(tmp_path):
    info = write_series(tmp_path / "s", volume(), affine_for("RAS"))
    ds = pydicom.dcmread(info["files"][3])
    ds.ImagePositionPatient = ["1.0", "2.0"]  # two numbers instead of three
    ds.save_as(info["files"][3])
    with pytest.raises(DataError, match="not a list of numbers"):
        read_series(tmp_path / "s")


def test_folder_without_dicom_is_not_a_series(tmp_path):
    (tmp_path / "n").mkdir()
    nib.save(nib.Nifti1Image(volume(), np.eye(4)), str(tmp_path / "n" / "a.nii.gz"))
    assert not is_dicom_input(tmp_path / "n")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("hello")
    assert not is_dicom_input(tmp_path / "t")
    with pytest.raises(DataError, match="no DICOM file"):
        read_series(tmp_path / "t")


# ------------------------------------------------------------------ zips
def zip_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"study/{f.relative_to(folder)}")
    return path


def test_zip_of_a_series(tmp_path):
    array, affine = volume(seed=7), affine_for("permuted")
    write_series(tmp_path / "s", array, affine, ext="")
    z = zip_folder(tmp_path / "s", tmp_path / "series.zip")
    assert is_dicom_input(z)
    dv, out = convert(z, tmp_path / "ct.nii.gz")
    img = nib.load(str(out))
    equal, err = same_world(array, affine, np.asarray(img.dataobj), img.affine)
    assert equal and err < 1e-4


def _member(zf: zipfile.ZipFile, name: str, data: bytes, mode: int | None = None) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    if mode is not None:
        info.external_attr = mode << 16
    zf.writestr(info, data)


@pytest.mark.parametrize("hostile", ["dotdot", "absolute", "symlink", "bomb", "many", "mixed", "garbage"])
def test_hostile_zips_are_refused(tmp_path, hostile):
    write_series(tmp_path / "s", volume(shape=(8, 8, 4)), affine_for("RAS"))
    good = [(f.name, f.read_bytes()) for f in sorted((tmp_path / "s").iterdir())]
    z = tmp_path / "h.zip"
    limits = {}
    if hostile == "garbage":
        z.write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    else:
        with zipfile.ZipFile(z, "w") as zf:
            for name, data in good:
                _member(zf, name, data)
            if hostile == "dotdot":
                _member(zf, "../../etc/evil", b"x")
            elif hostile == "absolute":
                _member(zf, "/tmp/evil", b"x")
            elif hostile == "symlink":
                _member(zf, "link", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
            elif hostile == "bomb":
                _member(zf, "zeros", b"\0" * (8 << 20))  # 8 MiB of zeros compress to ~8 KiB
                limits = {"max_bytes": 1 << 20}
            elif hostile == "many":
                for i in range(60):
                    _member(zf, f"junk/{i}", b"")
                limits = {"max_files": 50}
            elif hostile == "mixed":
                other = tmp_path / "o"
                write_series(other, volume(shape=(8, 8, 4), seed=9), affine_for("LPS"))
                for f in sorted(other.iterdir()):
                    _member(zf, f"other/{f.name}", f.read_bytes())
    size_before = sum(1 for _ in Path("/tmp").glob("evil"))
    with pytest.raises(DataError) as e:
        read_series(z, **limits)
    assert "\n" not in str(e.value)
    assert sum(1 for _ in Path("/tmp").glob("evil")) == size_before
    expected = {"dotdot": "outside", "absolute": "outside", "symlink": "symbolic link", "bomb": "unpacks to",
                "many": "entries", "mixed": "--series-uid", "garbage": "zip"}[hostile]
    assert expected in str(e.value)


def test_zip_bomb_with_a_lying_header_is_stopped_while_streaming(tmp_path):
    """A member whose declared size is small but whose stream is large: zipfile stops at the
    declared size with a CRC/size error, and the reader turns that into a DataError."""
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w") as zf:
        _member(zf, "zeros", b"\0" * (4 << 20))
    raw = bytearray(z.read_bytes())
    # patch the declared uncompressed size (local header offset 22, central directory entry offset 24)
    cd = raw.rfind(b"PK\x01\x02")
    raw[22:26] = (100).to_bytes(4, "little")
    raw[cd + 24:cd + 28] = (100).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    with pytest.raises(DataError):
        read_series(z, max_bytes=1 << 20)


# ------------------------------------------------------------------ SEG
def spleen_mask(shape) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[3:8, 2:6, 1:5] = 1
    m[9, 7, 6] = 1  # an asymmetric voxel: a flipped or transposed frame would not match
    return m


@pytest.mark.parametrize("kind", ["LPS", "permuted"])
def test_seg_round_trip_slice_by_slice(tmp_path, kind):
    array, affine = volume(), affine_for(kind)
    info = write_series(tmp_path / "s", array, affine, names="shuffled")
    dv = read_series(tmp_path / "s")
    # the mask is defined on the NIfTI truth grid, moved onto the reader's grid by world position
    mask_truth = spleen_mask(array.shape)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.io_orientation(dv.volume.affine))
    mask = nib.orientations.apply_orientation(mask_truth, ornt).astype(np.uint8)
    out = write_seg(mask, dv, tmp_path / "mask.dcm", algorithm_version="test-1", parameters={"model": "tiny.pt"})
    seg = hd.seg.segread(str(out))
    assert seg.SeriesInstanceUID != info["series"]
    assert seg.StudyInstanceUID == info["study"] and seg.FrameOfReferenceUID == info["frame"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series"]
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    alg = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "spleen-seg" and alg.AlgorithmVersion == "test-1"
    assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    # decoded back, slice by slice against the source instances
    back = read_seg(out, dv)
    assert np.array_equal(back, mask)
    for k, h in enumerate(dv.headers):
        frame = seg.get_pixels_by_source_instance([h.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        assert np.array_equal(frame, mask[:, :, k].T), f"slice {k}"
    # the mask lands on the same world voxels as the truth
    equal, err = same_world(mask_truth, affine, back, dv.volume.affine)
    assert equal and err < 1e-4


def test_non_image_dicom_in_the_folder_is_ignored(tmp_path):
    """A SEG saved into the series folder (and a DICOM file without a plane) do not join the series."""
    array = volume()
    write_series(tmp_path / "s", array, affine_for("RAS"))
    dv = read_series(tmp_path / "s")
    write_seg(spleen_mask(array.shape), dv, tmp_path / "s" / "mask.dcm")
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta, report.SOPClassUID, report.SOPInstanceUID, report.Modality = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "SR"
    report.save_as(tmp_path / "s" / "REPORT", enforce_file_format=True)
    again = read_series(tmp_path / "s")
    assert len(again.headers) == array.shape[2] and np.array_equal(again.volume.array, array)


def test_seg_of_a_series_stripped_of_patient_and_study_attributes(tmp_path):
    """Anonymisers delete type-2 attributes (patient, study date, accession...); the SEG is still written."""
    array = volume()
    info = write_series(tmp_path / "s", array, affine_for("LPS"))
    for f in info["files"]:
        ds = pydicom.dcmread(f)
        for attr in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                     "AccessionNumber", "ReferringPhysicianName", "SeriesNumber", "Manufacturer", "SliceThickness"):
            delattr(ds, attr)
        ds.save_as(f)
    dv = read_series(tmp_path / "s")
    mask = spleen_mask(array.shape)
    out = write_seg(mask, dv, tmp_path / "seg.dcm")
    assert np.array_equal(read_seg(out, dv), mask)
    assert "PatientID" not in dv.headers[0]  # the reader's headers are left as they were


def test_empty_mask_gives_a_valid_seg(tmp_path):
    array = volume()
    write_series(tmp_path / "s", array, affine_for("RAS"))
    dv = read_series(tmp_path / "s")
    out = write_seg(np.zeros(array.shape, np.uint8), dv, tmp_path / "empty.dcm")
    seg = hd.seg.segread(str(out))
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    assert read_seg(out, dv).sum() == 0


# ------------------------------------------------------------------ predict
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from spleen_utils.config import Recipe
    from spleen_utils.model import build_network, save_checkpoint

    torch.manual_seed(0)
    tiny = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)
    return save_checkpoint(build_network(tiny), tiny, tmp_path_factory.mktemp("dicom") / "tiny.pt")


def body(shape=(40, 36, 12)) -> np.ndarray:
    """Air around a soft-tissue body with a brighter blob: a CT-like volume."""
    a = np.full(shape, -1000.0, dtype=np.float32)
    a[4:-4, 4:-4, :] = 40
    a[10:20, 10:18, 3:9] = 120
    return a


def test_predict_series_writes_seg(tiny_model, tmp_path):
    array, affine = body(), affine_for("LPS", spacing=(4.0, 4.0, 5.0))
    info = write_series(tmp_path / "s", array, affine, names="shuffled", ext="")
    z = zip_folder(tmp_path / "s", tmp_path / "s.zip")
    for src, name in ((tmp_path / "s", "a"), (z, "b")):
        out = tmp_path / f"{name}.dcm"
        assert cli.main(["predict", "--model", str(tiny_model), "--input", str(src), "--output", str(out), "--device", "cpu",
                         "--json", str(tmp_path / f"{name}.json")]) == 0
        seg = hd.seg.segread(str(out))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series"]
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spleen-seg"
        dv = read_series(src)
        back = read_seg(out, dv)
        assert back.shape == array.shape and set(np.unique(back)) <= {0, 1}
    # the same series to a NIfTI mask: the SEG holds the same voxels
    assert cli.main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "s"), "--output", str(tmp_path / "m.nii.gz"),
                     "--device", "cpu"]) == 0
    nifti = nib.load(str(tmp_path / "m.nii.gz"))
    assert np.allclose(nifti.affine, affine, atol=1e-5)
    assert np.array_equal(np.asarray(nifti.dataobj), read_seg(tmp_path / "a.dcm", read_series(tmp_path / "s")))


def test_seg_output_needs_a_dicom_input(tiny_model, tmp_path):
    nib.save(nib.Nifti1Image(body(), np.diag([4.0, 4.0, 5.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    assert cli.main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "ct.nii.gz"),
                     "--output", str(tmp_path / "m.dcm"), "--device", "cpu"]) == 2
    assert not (tmp_path / "m.dcm").exists()


# ------------------------------------------------------------------ service
@pytest.fixture(scope="module")
def service_client(tmp_path_factory):
    import warnings

    import torch

    from spleen_utils.config import Recipe
    from spleen_utils.export import export_onnx
    from spleen_utils.model import build_network, save_checkpoint
    from spleen_utils.serve import ServiceSettings, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    d = tmp_path_factory.mktemp("dicom_service")
    torch.manual_seed(0)
    tiny = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)
    save_checkpoint(build_network(tiny), tiny, d / "m.pt")
    export_onnx(d / "m.pt", d / "m.onnx", validate=False)
    app = create_app(ServiceSettings(model=d / "m.onnx", sw_roi=(64, 64, 32), tmp_dir=d / "tmp", max_queue=2))
    with TestClient(app) as client:
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.2)
        client.tmp_dir = d / "tmp"
        yield client


def _post(client, data: bytes, endpoint="/segment", filename="series.zip"):
    return client.post(endpoint, files={"file": (filename, data, "application/zip")})


@pytest.mark.slow
def test_service_zip_in_seg_out(service_client, tmp_path):
    array, affine = body(), affine_for("LPS", spacing=(4.0, 4.0, 5.0))
    info = write_series(tmp_path / "s", array, affine, names="shuffled", ext="")
    z = zip_folder(tmp_path / "s", tmp_path / "s.zip").read_bytes()
    r = _post(service_client, z)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["content-disposition"].endswith('series_spleen_seg.dcm"')
    (tmp_path / "seg.dcm").write_bytes(r.content)
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info["series"]
    back = read_seg(tmp_path / "seg.dcm", read_series(tmp_path / "s"))
    assert int(back.sum()) == int(r.headers["x-spleen-voxels"])
    j = _post(service_client, z, endpoint="/predict")
    assert j.status_code == 200, j.text
    assert j.json()["dicom"] == {"series": info["series"], "slices": array.shape[2]}
    assert j.json()["image"]["shape"] == list(array.shape)
    assert sorted(p.name for p in service_client.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("hostile", ["dotdot", "symlink", "mixed", "anonymised"])
def test_service_refuses_hostile_zips_with_4xx_json(service_client, tmp_path, hostile):
    write_series(tmp_path / "s", body(), affine_for("RAS", spacing=(4.0, 4.0, 5.0)), uids=hostile != "anonymised")
    buf = tmp_path / "h.zip"
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            _member(zf, f.name, f.read_bytes())
        if hostile == "dotdot":
            _member(zf, "../../x", b"x")
        elif hostile == "symlink":
            _member(zf, "l", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
        elif hostile == "mixed":
            write_series(tmp_path / "o", body(), affine_for("LPS", spacing=(4.0, 4.0, 5.0)))
            for f in sorted((tmp_path / "o").iterdir()):
                _member(zf, f"o/{f.name}", f.read_bytes())
    r = _post(service_client, buf.read_bytes())
    assert r.status_code == 422, r.text
    body_ = r.json()
    assert body_["error"] == ("no_dicom_seg" if hostile == "anonymised" else "bad_dicom")
    assert str(service_client.tmp_dir) not in body_["detail"] and "/tmp" not in body_["detail"]
    assert "series.zip" in body_["detail"] or hostile == "anonymised"
    if hostile == "mixed":
        assert "one series per zip" in body_["detail"]
    if hostile == "anonymised":  # no SEG can reference it, but it can still be measured
        assert _post(service_client, buf.read_bytes(), endpoint="/predict").status_code == 200
    assert sorted(p.name for p in service_client.tmp_dir.iterdir()) == []


def test_library_writer_round_trips_a_shipped_ct_geometry(tmp_path):
    """spleen_utils.dicom.write_series (for the tutorial) -> read_series: same HU, same affine."""
    from spleen_utils.dicom import write_series as library_write_series
    from spleen_utils.io import Volume

    array, affine = volume(shape=(34, 33, 5), seed=12), affine_for("oblique")
    vol = Volume(array=array, affine=affine, header=nib.Nifti1Header())
    files = library_write_series(vol, tmp_path / "s", compress=pydicom.uid.JPEG2000Lossless)
    assert len(files) == 5
    got = read_series(tmp_path / "s").volume
    equal, err = same_world(array, affine, got.array, got.affine)
    assert equal and err < 1e-4
    sheared = affine.copy()
    sheared[0, 2] += 1.0
    with pytest.raises(DataError, match="sheared"):
        library_write_series(Volume(array=array, affine=sheared, header=nib.Nifti1Header()), tmp_path / "x")
