"""DICOM out: a mask as a DICOM SEG that references its source series (:func:`write_seg`, read back by
:func:`read_seg`), and a NIfTI CT as a DICOM CT series (:func:`write_series`, for the tutorial and
for trying the DICOM path without a scanner). :mod:`spleen_utils.dicom` reads series and
re-exports these; pydicom and highdicom are the optional extra ``dicom``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, SpleenError

if TYPE_CHECKING:
    from .dicom import DicomVolume
    from .io import Volume

#: DICOM's LPS patient coordinates to NIfTI's RAS world
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: patient and study attributes a SEG copies from its source (type 2: present, possibly empty)
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                "StudyTime", "ReferringPhysicianName")


def require_pydicom():
    """pydicom, or one sentence saying how to install the optional 'dicom' extra."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise SpleenError("DICOM support needs the optional 'dicom' extra: pip install torch==2.13.0 -e '.[dicom]' (make env installs it).") from None
    import pydicom

    return pydicom


# ---------------------------------------------------------------------------------------------
# DICOM SEG


def write_seg(mask: np.ndarray, source: DicomVolume, path: str | Path, algorithm_version: str | None = None,
              parameters: dict[str, str] | None = None) -> Path:
    """Write ``mask`` (on ``source``'s grid, 1 = spleen) as a binary DICOM Segmentation.

    Refuses (one sentence) a source whose study, series, frame-of-reference or instance UIDs
    were emptied: a SEG references its images by those UIDs, so a viewer could never place it.
    """
    require_pydicom()
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from . import __version__
    from .io import atomic_path

    path = Path(path)
    mask = np.asarray(mask)
    if mask.shape != source.volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the series grid {source.volume.shape}")
    missing = source.missing_uids
    if missing:
        raise DataError(f"{source.series.key}: the series has empty {', '.join(missing)} (anonymised), so a DICOM SEG could not reference it; "
                        f"write a NIfTI mask (.nii.gz) instead.")
    version = algorithm_version or __version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name="spleen-seg", version=version, family=codes.cid7162.ArtificialIntelligence,
        parameters={k: str(v)[:64] for k, v in (parameters or {}).items()} or None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Spleen",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Spleen,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=generate_uid(), tracking_id="spleen")
    frames = np.ascontiguousarray((mask > 0).transpose(2, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    first = source.headers[0]
    try:
        number = int(getattr(first, "SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        number = 1000
    # anonymisers often delete the patient and study attributes highdicom copies (type 2 in the
    # SEG: present, possibly empty); give it copies with the missing ones empty, and the slice
    # spacing as the thickness where none is given (the SEG's pixel measures need one)
    gap = float(np.linalg.norm(source.volume.affine[:3, 2]))
    sources = []
    for h in source.headers:
        h = copy.deepcopy(h)  # small: headers without pixels
        for attr in TYPE2_COPIED:
            if attr not in h:
                setattr(h, attr, "")
        if not str(getattr(h, "SliceThickness", "") or "").strip():
            h.SliceThickness = f"{gap:.6g}"
        sources.append(h)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="spleen-seg",
        manufacturer_model_name="spleen-seg MONAI UNet",
        software_versions=f"spleen-seg {__version__}",
        device_serial_number="0",
        series_description=f"Spleen segmentation (spleen-seg {version})"[:64],
        content_description="Spleen segmentation",
        content_label="SPLEEN",
        omit_empty_frames=True,
    )
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(str(tmp))
    return path


def read_seg(path: str | Path, source: DicomVolume) -> np.ndarray:
    """A SEG's segment 1 back onto ``source``'s grid (uint8, the volume's axis order)."""
    require_pydicom()
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [str(h.SOPInstanceUID) for h in source.headers]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                           assert_missing_frames_are_empty=True)
    return np.ascontiguousarray(px[..., 0].transpose(2, 1, 0)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# NIfTI -> a DICOM series (for the tutorial and for trying the DICOM path without a scanner)


def write_series(volume: Volume, folder: str | Path, *, series_description: str = "spleen-seg example CT",
                 patient_name: str = "Example^Spleen", compress: str | None = None, file_names: str = "IM{:04d}") -> list[Path]:
    """Write a CT volume as a single-frame DICOM CT series (one file per slice along array axis 2).

    Voxels are stored as int16 with RescaleIntercept -1024 (rounded to whole HU); the geometry is
    the volume's exact affine (RAS to DICOM's LPS). ``compress``: a transfer syntax UID to encode
    with (``pydicom.uid.JPEG2000Lossless``, ``JPEGLSLossless``, ``RLELossless``), or None for
    explicit VR little endian. The patient name is a placeholder: this is example data. A
    sheared affine (columns not orthogonal) cannot be stored as DICOM slices and is refused.
    """
    require_pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(volume.affine, dtype=np.float64)
    sx, sy, sz = (float(np.linalg.norm(lps[:3, i])) for i in range(3))
    r, c = lps[:3, 0] / sx, lps[:3, 1] / sy
    n = np.cross(r, c)
    if abs(r @ c) > 1e-6 or abs(abs(n @ lps[:3, 2]) / sz - 1) > 1e-6:
        raise DataError("the volume's affine is sheared (its axes are not orthogonal); it cannot be written as DICOM slices.")
    hu = np.rint(np.asarray(volume.array, dtype=np.float64))
    if hu.min() < -32768 + 1024 or hu.max() > 32767 - 1024:
        raise DataError(f"the volume's values ({hu.min():g} to {hu.max():g}) do not fit 16-bit CT with intercept -1024.")
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    written = []
    for k in range(hu.shape[2]):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "EXAMPLE", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "CT", 1, k + 1, series_description[:64]
        ds.Manufacturer, ds.PositionReferenceIndicator, ds.ImageType = "spleen-seg", "", ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # between rows (array axis 1), between columns (axis 0)
        ds.SliceThickness = f"{sz:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.PixelData = np.ascontiguousarray((hu[:, :, k].T + 1024).astype(np.int16)).tobytes()
        if compress is not None:
            ds.compress(compress)
        path = folder / file_names.format(k + 1)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
