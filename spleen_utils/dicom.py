"""DICOM in, DICOM out: a CT series (folder or zip) to a NIfTI-ready volume, a mask to DICOM SEG.

Reading (pydicom 3; compressed transfer syntaxes through the pylibjpeg plugins: JPEG 2000 with
``pylibjpeg-openjpeg``, JPEG-LS and lossless JPEG with ``pylibjpeg-libjpeg``):

* a file is DICOM when it carries the ``DICM`` marker after its 128-byte preamble, whatever its
  name (scanner exports often have no ``.dcm`` extension); files that are not single-frame
  slices with a plane geometry (DICOMDIR, reports, SEG objects) are ignored; headers are read first, a
  series' pixels only once it is chosen;
* images are grouped into series by Series Instance UID; an anonymised series whose UIDs were
  emptied is grouped by series number, size and orientation and gets a label such as
  ``no-uid-1`` that ``series_uid=`` accepts; several series and no choice is an error listing
  them;
* slices are sorted by their position along the slice normal (``ImagePositionPatient`` projected
  on ``row x column`` of ``ImageOrientationPatient``), never by file name or instance number;
* uneven slice spacing, duplicate positions, gantry tilt (slice origins that drift in-plane),
  mixed orientations or sizes are refused with one sentence (resampling them silently would
  move a mask off the anatomy);
* voxels are the modality LUT's output (``RescaleSlope`` / ``RescaleIntercept``, per slice), so
  CT comes out in Hounsfield units;
* the affine is exact: DICOM's LPS patient coordinates become NIfTI's RAS world, with array axis
  0 along a row (column index), axis 1 down the columns (row index), axis 2 along the sorted
  slices.

Zips are hostile input: members with ``..`` or absolute paths, symbolic links, encrypted
members, more than ``max_files`` members or more than ``max_bytes`` uncompressed (counted while
streaming, not trusted from the header) are refused; members are extracted under numbered names
into a private temporary folder, so no name can escape it.

Writing (:mod:`spleen_utils.dicom_write`, re-exported here): :func:`write_seg` makes a binary DICOM Segmentation with highdicom that references the
source series, its study and frame of reference, codes the segment as SNOMED CT Spleen
(78961009) in the category Anatomical Structure (91723000), and names the algorithm
(``spleen-seg``, its version, family Artificial Intelligence). An empty mask is a valid SEG too.

pydicom and highdicom are the optional extra ``dicom`` (``pip install -e '.[dicom]'``, part of
``make env``); without them :func:`is_dicom_input` still works and every reader says how to
install them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from .errors import DataError
from .dicom_write import LPS_TO_RAS, read_seg, require_pydicom, write_seg, write_series  # noqa: F401  (the DICOM-out half)
from .io import Volume

#: zip limits for a command-line input (the service passes tighter ones)
MAX_ZIP_FILES = 10_000
MAX_ZIP_BYTES = 4 << 30
#: tolerance on the gaps between slices: 1 % of the gap, at least 0.02 mm (scanners round
#: ImagePositionPatient to a few decimals)
GAP_RTOL = 1e-2
GAP_ATOL_MM = 0.02
#: the most any slice origin may sit off the line through the first one along the normal (in-plane
#: drift, i.e. gantry tilt): a fifth of a pixel, at least 0.05 mm. Below it the stack is taken as
#: straight (the affine's slice axis is the normal) and no voxel moves by more than that.
TILT_PIXEL_FRACTION = 0.2
TILT_ATOL_MM = 0.05
#: cosine tolerance for "the same orientation"
ORIENT_TOL = 1e-4
#: how many files the DICOM-or-NIfTI sniff of a folder looks at
SNIFF_FILES = 200
SEG_SUFFIXES = (".dcm",)


# ---------------------------------------------------------------------------------------------
# what is DICOM


def has_dicom_marker(path: str | Path) -> bool:
    """Whether a file has the DICOM Part 10 preamble: ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_zip(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


def _walk_files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def is_dicom_input(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM series: a zip, a DICOM file, or a folder holding DICOM files.

    A folder with NIfTI files directly inside stays a folder of NIfTI files; otherwise it is a
    series folder when any of its first files (recursively) carries the ``DICM`` marker.
    """
    p = Path(path)
    if p.is_file():
        if str(p).endswith((".nii", ".nii.gz")):
            return False
        return p.suffix.lower() == ".zip" or is_zip(p) or has_dicom_marker(p)
    if not p.is_dir():
        return p.suffix.lower() == ".zip"
    if any(c.name.endswith((".nii", ".nii.gz")) for c in p.iterdir()):
        return False
    for i, f in enumerate(_walk_files(p)):
        if i >= SNIFF_FILES:
            break
        if has_dicom_marker(f):
            return True
    return False


def is_seg_name(path: str | Path) -> bool:
    """An output name that asks for a DICOM SEG (``mask.dcm``)."""
    return str(path).lower().endswith(SEG_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# zips


@contextlib.contextmanager
def extracted(path: str | Path, max_files: int = MAX_ZIP_FILES, max_bytes: int = MAX_ZIP_BYTES, name: str | None = None) -> Iterator[Path]:
    """A folder holding the zip's files (a private temporary folder, removed afterwards).

    Refuses (:class:`DataError`, one sentence) members with ``..`` or absolute paths, symbolic
    links, encrypted members, more than ``max_files`` members, or more than ``max_bytes``
    uncompressed bytes (declared or actually streamed). ``name``: how messages call the zip.
    """
    path = Path(path)
    name = name or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{name}: not a readable zip archive ({type(e).__name__}).") from None
    with zf, tempfile.TemporaryDirectory(prefix="spleen-dicom-") as tmp:
        infos = zf.infolist()
        files = [i for i in infos if not i.is_dir()]
        if len(infos) > max_files:
            raise DataError(f"{name}: the zip holds {len(infos)} entries, more than the {max_files} accepted.")
        declared = 0
        for info in infos:
            member = info.filename.replace("\\", "/")
            parts = PurePosixPath(member).parts
            if member.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
                raise DataError(f"{name}: the zip member {info.filename!r} points outside the archive; refused.")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{name}: the zip member {info.filename!r} is a symbolic link; refused.")
            if info.flag_bits & 0x1:
                raise DataError(f"{name}: the zip member {info.filename!r} is encrypted; give an unencrypted zip.")
            declared += int(info.file_size)
        if declared > max_bytes:
            raise DataError(f"{name}: the zip unpacks to {declared} bytes, more than the {max_bytes} accepted.")
        total = 0
        out_dir = Path(tmp)
        try:
            for k, info in enumerate(files):
                with zf.open(info) as src, open(out_dir / f"{k:06d}", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        total += len(chunk)
                        if total > max_bytes:
                            raise DataError(f"{name}: the zip unpacks to more than the {max_bytes} bytes accepted.")
                        dst.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as e:
            raise DataError(f"{name}: the zip is corrupt or uses an unsupported compression ({type(e).__name__}).") from None
        yield out_dir


@contextlib.contextmanager
def series_folder(path: str | Path, name: str | None = None, **zip_limits: int) -> Iterator[Path]:
    """The folder to read a series from: ``path`` itself, or a zip's safely extracted copy."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder.")
    if p.is_file():
        if not is_zip(p):
            if has_dicom_marker(p):
                raise DataError(f"{p}: is a single DICOM file; give the folder (or a zip) that holds its series.")
            raise DataError(f"{p}: neither a DICOM series folder nor a zip of one.")
        with extracted(p, name=name, **zip_limits) as d:
            yield d
    else:
        yield p


# ---------------------------------------------------------------------------------------------
# series


@dataclass
class Series:
    """One series found in a folder: its key, what it is, and its files (headers only)."""

    key: str  # the Series Instance UID, or ``no-uid-N`` for a series whose UID was emptied
    uid: str
    description: str
    modality: str
    number: str
    headers: list[Any] = field(default_factory=list)  # pydicom Datasets without pixel data
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        what = ", ".join(v for v in (self.modality, self.description and repr(self.description), f"{len(self.files)} images") if v)
        return f"{self.key} ({what})"


@dataclass
class DicomVolume:
    """A series read as a volume: :class:`~spleen_utils.io.Volume` plus its sorted source headers."""

    volume: Volume
    series: Series
    headers: list[Any]  # sorted along the slice normal, the order of array axis 2

    @property
    def missing_uids(self) -> list[str]:
        first = self.headers[0]
        names = ["StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"]
        missing = [n for n in names if not str(getattr(first, n, "") or "").strip()]
        if any(not str(getattr(h, "SOPInstanceUID", "") or "").strip() for h in self.headers):
            missing.append("SOPInstanceUID")
        return missing


def _text(ds, name: str) -> str:
    v = getattr(ds, name, "")
    return "" if v is None else str(v).strip()


def _is_image(ds) -> bool:
    """A single-frame image slice with a plane geometry (judged from the header, read without pixels)."""
    return all(t in ds for t in ("Rows", "Columns", "BitsAllocated", "ImagePositionPatient", "ImageOrientationPatient")) \
        and int(getattr(ds, "NumberOfFrames", 1) or 1) == 1


def find_series(folder: str | Path, where: str | None = None) -> list[Series]:
    """Every image series in ``folder`` (recursively), from headers only; ``where`` names it in messages."""
    pydicom = require_pydicom()
    folder = Path(folder)
    where = where or str(folder)
    groups: dict[Any, Series] = {}
    n_dicom = n_multiframe = 0
    for f in _walk_files(folder):
        if not has_dicom_marker(f):
            continue
        n_dicom += 1
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)  # headers only: a series' pixels are read once it is chosen
        except Exception as e:  # noqa: BLE001  pydicom raises many kinds on damaged files
            raise DataError(f"{f.name}: a damaged DICOM file ({type(e).__name__}: {str(e)[:120]}).") from None
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            n_multiframe += 1
        if not _is_image(ds):
            continue
        uid = _text(ds, "SeriesInstanceUID")
        if uid:
            gkey: Any = uid
        else:  # anonymised without UIDs: what a series shares
            try:
                iop = tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
            except (ValueError, TypeError):
                iop = (str(ds.ImageOrientationPatient),)
            gkey = ("", _text(ds, "SeriesNumber"), _text(ds, "SeriesDescription"), int(ds.Rows), int(ds.Columns), iop)
        s = groups.get(gkey)
        if s is None:
            s = groups[gkey] = Series(key=uid, uid=uid, description=_text(ds, "SeriesDescription"), modality=_text(ds, "Modality"),
                                      number=_text(ds, "SeriesNumber"))
        s.headers.append(ds)
        s.files.append(f)
    series = list(groups.values())
    for k, s in enumerate(s for s in series if not s.uid):
        s.key = f"no-uid-{k + 1}"
    if not series:
        if n_multiframe:
            raise DataError(f"{where}: holds only multi-frame (enhanced) DICOM images, which this reader does not take; export the series as single-frame images.")
        if n_dicom:
            raise DataError(f"{where}: holds {n_dicom} DICOM files but no image slices with a position and orientation.")
        raise DataError(f"{where}: holds no DICOM file (none carries the 'DICM' marker).")
    return series


def select_series(series: list[Series], series_uid: str | None, where: str, hint: str = "choose one with --series-uid") -> Series:
    if series_uid:
        hits = [s for s in series if series_uid in (s.key, s.uid)]
        if not hits:
            raise DataError(f"{where}: no series {series_uid!r}; it holds {'; '.join(s.summary() for s in series)}.")
        return hits[0]
    if len(series) > 1:
        listing = "; ".join(s.summary() for s in series)
        raise DataError(f"{where}: holds {len(series)} series ({listing}); {hint}.")
    return series[0]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def geometry(headers: list[Any], where: str) -> tuple[list[int], np.ndarray]:
    """Sort slices along the normal and check the grid; returns (order, LPS affine of the sorted stack)."""
    try:
        return _geometry(headers, where)
    except (ValueError, TypeError, AttributeError, IndexError):  # a position, orientation or spacing that is not numbers
        raise DataError(f"{where}: a slice's ImagePositionPatient, ImageOrientationPatient or PixelSpacing is not a list of numbers.") from None


def _geometry(headers: list[Any], where: str) -> tuple[list[int], np.ndarray]:
    first = headers[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    if iop.size != 6 or not np.all(np.isfinite(iop)):
        raise DataError(f"{where}: the ImageOrientationPatient {list(iop)} is not six numbers.")
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise DataError(f"{where}: the ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors.")
    r, c = _unit(r), _unit(c)
    n = np.cross(r, c)
    rows, cols = int(first.Rows), int(first.Columns)
    ps = [float(v) for v in getattr(first, "PixelSpacing", None) or []]
    if len(ps) != 2 or min(ps) <= 0:
        raise DataError(f"{where}: the first slice has no valid PixelSpacing ({ps}).")
    for h in headers[1:]:
        if (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise DataError(f"{where}: slices differ in size ({rows}x{cols} and {int(h.Rows)}x{int(h.Columns)}); the series is not one volume.")
        if np.abs(np.array([float(v) for v in h.ImageOrientationPatient]) - iop).max() > ORIENT_TOL * 10:
            raise DataError(f"{where}: slices differ in orientation (ImageOrientationPatient); the series is not one volume.")
        if not np.allclose([float(v) for v in getattr(h, "PixelSpacing", [0, 0])], ps, rtol=1e-4, atol=1e-5):
            raise DataError(f"{where}: slices differ in PixelSpacing; the series is not one volume.")
    if len(headers) < 2:
        raise DataError(f"{where}: the series has a single slice; a 3D CT volume needs at least two.")
    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers], dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise DataError(f"{where}: a slice has a non-finite ImagePositionPatient.")
    along = pos @ n
    order = [int(i) for i in np.argsort(along, kind="stable")]
    pos, along = pos[order], along[order]
    gaps = np.diff(along)
    tol = max(GAP_ATOL_MM, GAP_RTOL * float(np.median(gaps)))
    if gaps.min() <= tol:
        k = int(np.argmin(gaps))
        raise DataError(f"{where}: two slices share the position {along[k]:.2f} mm along the normal (repeated or overlapping acquisitions); "
                        f"select one acquisition.")
    if gaps.max() - gaps.min() > tol:
        raise DataError(f"{where}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm between slices, missing or extra slices?); "
                        f"this reader refuses it rather than resample silently.")
    offsets = pos - pos[0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ n, n), axis=1)  # in-plane offset of each origin: zero unless tilted
    if drift.max() > max(TILT_ATOL_MM, TILT_PIXEL_FRACTION * min(ps)):
        k = int(np.argmax(drift))
        tilt = float(np.degrees(np.arctan2(drift[k], along[k] - along[0])))
        raise DataError(f"{where}: the slices are sheared (gantry tilt of about {tilt:.1f} degrees); this reader refuses a tilted series "
                        f"rather than resample it silently.")
    step = n * (along[-1] - along[0]) / (len(pos) - 1)  # straight along the normal (drift is below a fifth of a pixel)
    lps = np.eye(4)
    lps[:3, 0] = r * ps[1]  # array axis 0: along a row (column index), column spacing
    lps[:3, 1] = c * ps[0]  # array axis 1: down a column (row index), row spacing
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    return order, lps


def _slice_values(ds, where: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise DataError(f"{where}: the images are colour ({ds.PhotometricInterpretation}); a CT series is greyscale.")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001  missing decoder plugin, truncated pixel data, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise DataError(f"{where}: cannot decode the pixel data (transfer syntax {ts_name}: {str(e).splitlines()[0][:160]}).") from None
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds)
    return np.asarray(arr, dtype=np.float32)


def read_series(source: str | Path, series_uid: str | None = None, name: str | None = None,
                hint: str = "choose one with --series-uid", max_voxels: int | None = None, **zip_limits: int) -> DicomVolume:
    """Read one series from a folder or zip into a volume with an exact RAS affine.

    ``series_uid``: the Series Instance UID (or the ``no-uid-N`` label) to take when the source
    holds several series (``hint`` says how, in the message that lists them). ``name``: how
    messages call the source (a service passes the client's file name, never its temp path).
    ``max_voxels``: refuse a larger series before its pixels are decoded. Raises
    :class:`DataError` with one sentence for everything a user can get wrong (see the module
    docstring).
    """
    pydicom = require_pydicom()
    source = Path(source)
    display = name or str(source)
    with series_folder(source, name=name, **zip_limits) as folder:
        s = select_series(find_series(folder, display), series_uid, display, hint)
        where = f"{display} (series {s.key})"
        order, lps = geometry(s.headers, where)
        headers = [s.headers[i] for i in order]
        files = [s.files[i] for i in order]
        rows, cols = int(headers[0].Rows), int(headers[0].Columns)
        if max_voxels is not None and rows * cols * len(headers) > max_voxels:
            raise DataError(f"{where}: {cols}x{rows}x{len(headers)} voxels, more than the {max_voxels} accepted.")
        array = np.empty((cols, rows, len(headers)), dtype=np.float32)
        for k, f in enumerate(files):  # one slice's pixels in memory at a time, besides the volume
            try:
                ds = pydicom.dcmread(f)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{where}: the slice {f.name} is damaged ({type(e).__name__}).") from None
            if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise DataError(f"{where}: the slice {f.name} has no pixel data.")
            values = _slice_values(ds, where)
            if values.shape != (rows, cols):
                raise DataError(f"{where}: a slice's pixel data has shape {values.shape}, not {rows}x{cols}.")
            array[:, :, k] = values.T
    if not np.isfinite(array).all():
        raise DataError(f"{where}: the series contains NaN or infinite voxels.")
    affine = LPS_TO_RAS @ lps
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    vol = Volume(array=array, affine=affine, header=img.header, path=source)
    return DicomVolume(volume=vol, series=s, headers=headers)


def load_image(path: str | Path, series_uid: str | None = None) -> Volume:
    """A CT volume from a NIfTI file or a DICOM series (folder or zip): the notebooks' one loader."""
    from .io import load_nifti

    return read_series(path, series_uid=series_uid).volume if is_dicom_input(path) else load_nifti(path)


def convert(source: str | Path, output: str | Path, series_uid: str | None = None) -> tuple[DicomVolume, Path]:
    """A series (folder or zip) to a NIfTI file; whole-number HU are stored as int16."""
    from .io import is_nifti_name, save_nifti

    output = Path(output)
    if not is_nifti_name(output):
        raise DataError(f"{output}: the output must be a .nii or .nii.gz file.")
    dv = read_series(source, series_uid=series_uid)
    a = dv.volume.array
    if np.all(np.mod(a, 1) == 0) and a.min() >= -32768 and a.max() <= 32767:
        a = a.astype(np.int16)
    save_nifti(a, dv.volume.affine, output, header=dv.volume.header)
    return dv, output


#: a service's zip limits: files per upload, and bytes for ``max_voxels`` 16-bit voxels plus headers
SERVICE_MAX_FILES = 2048


def upload_limits(max_voxels: int, max_files: int = SERVICE_MAX_FILES) -> dict[str, int]:
    """Zip limits for an upload whose image may hold ``max_voxels`` voxels (16-bit, uncompressed)."""
    return {"max_files": int(max_files), "max_bytes": int(2 * max_voxels + max_files * 64 * 1024)}
