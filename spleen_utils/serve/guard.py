"""Reading an upload: its header first (the shared guard of :mod:`spleen_utils.io`, with this
service's voxel limit), then its voxels (a .nii.gz decompressed with a cap from its header), or a
zipped DICOM series (:mod:`spleen_utils.dicom`, with upload limits)."""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, SpleenError
from .uploads import ServiceError, Upload, _bad_image

#: a .nii.gz may decompress to at most this much more than its header declares (extensions, padding)
DECOMPRESS_SLACK = 16 * 1024 * 1024


@dataclass
class HeaderInfo:
    shape: tuple[int, int, int]
    dtype: str
    nbytes: int  # voxel bytes the header declares (+ its vox_offset)


def inspect_header(upload: Upload, max_voxels: int) -> HeaderInfo:
    """Validate the NIfTI header alone (no voxel is read): :func:`spleen_utils.io.read_header` (3D,
    numeric, within ``max_voxels``, its errors' kinds as the 422 codes), and a non-degenerate affine."""
    import numpy as np

    from ..io import NiftiHeaderError, read_header

    try:  # messages name only "upload", the shape and the voxel type
        img, shape = read_header(upload.path, "upload", gz=upload.gzip, max_voxels=max_voxels)
    except NiftiHeaderError as e:
        raise _bad_image(e.kind, str(e)) from None
    if abs(float(np.linalg.det(np.asarray(img.affine, dtype=np.float64)[:3, :3]))) < 1e-12:
        raise _bad_image("bad_geometry", "the NIfTI header's affine is degenerate (zero or non-finite voxel size).")
    dtype = img.get_data_dtype()
    offset = int(img.header.get_data_offset()) if hasattr(img.header, "get_data_offset") else 352
    return HeaderInfo(shape=shape, dtype=str(dtype), nbytes=offset + math.prod(shape) * dtype.itemsize)


def _gunzip_capped(src: Path, dst: Path, limit: int, chunk: int = 1 << 20) -> None:
    """Decompress ``src`` into ``dst``; stop beyond ``limit`` bytes; a bad CRC or a cut stream raises."""
    written = 0
    try:
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            while True:
                block = fin.read(chunk)
                if not block:
                    break
                written += len(block)
                if written > limit:
                    raise _bad_image("corrupt_nifti", "the .nii.gz holds more data than its NIfTI header declares.")
                fout.write(block)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile):
        raise _bad_image("corrupt_nifti", "the .nii.gz is truncated or corrupt (gzip stream or checksum error).") from None


def read_volume(upload: Upload, info: HeaderInfo):
    """The upload as a float32 :class:`spleen_utils.io.Volume` (after :func:`inspect_header`)."""
    import nibabel as nib
    import numpy as np

    from ..io import Volume

    path = upload.path
    if upload.gzip:
        fd, raw = tempfile.mkstemp(prefix="raw-", suffix=".nii", dir=path.parent)
        os.close(fd)
        raw_path = Path(raw)
        upload.extra.append(raw_path)
        _gunzip_capped(path, raw_path, info.nbytes + DECOMPRESS_SLACK)
        path.unlink()  # the compressed copy is no longer needed
        path = raw_path
    try:
        img = nib.load(str(path), mmap=False)
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(info.shape)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError):
        raise _bad_image("corrupt_nifti", "the NIfTI voxel data is truncated or corrupt.") from None
    if not np.isfinite(data).all():
        raise _bad_image("non_finite_voxels", "the image contains NaN or infinite voxels.")
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=None)


# a zipped DICOM series (spleen_utils.dicom): in, a volume on the series' grid; out, a DICOM SEG
#: stands for the NIfTI header of a zip upload (there is none; the DICOM reader checks the zip)
_DICOM_ZIP = HeaderInfo(shape=(0, 0, 0), dtype="DICOM series", nbytes=0)


def _is_zip_upload(upload: Upload) -> bool:
    with open(upload.path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _read_dicom_upload(upload: Upload, max_voxels: int):
    """The series in a zip upload (:func:`spleen_utils.dicom.read_series` with upload limits): 422
    for a hostile or unsuitable zip, 415 when this server has no DICOM support installed."""
    from ..dicom import read_series, upload_limits

    try:
        return read_series(upload.path, name=upload.filename, hint="upload one series per zip", max_voxels=max_voxels,
                           **upload_limits(max_voxels))
    except DataError as e:
        raise _bad_image("bad_dicom", str(e)) from None
    except SpleenError:
        raise ServiceError(415, "dicom_unsupported", "this server cannot read DICOM (its 'dicom' extra is not installed); upload NIfTI.") from None


def _write_dicom_seg(mask, series, path: Path) -> None:
    from ..dicom import write_seg

    try:
        write_seg(mask, series, path)
    except DataError as e:  # e.g. an anonymised series without UIDs
        raise _bad_image("no_dicom_seg", str(e)) from None

