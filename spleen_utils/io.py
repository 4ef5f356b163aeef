"""Reading and writing NIfTI safely: every way a file can be wrong becomes one clear sentence.

Masks are written atomically (a temporary file beside the target, then a rename), so an
interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: refuse images whose header asks for more voxels than this (about 4 GB as float32)
MAX_VOXELS = 1_000_000_000
#: the most bytes of NIfTI header extensions accepted (metadata, not voxels; read before nibabel does)
MAX_EXTENSION_BYTES = 1 << 20


def is_nifti_name(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


#: file-name endings of masks and label maps (MSD keeps them in labelsTr/, others beside the image)
MASK_SUFFIXES = ("_label", "_labels", "_spleen", "_seg", "_mask", "_pred")


def looks_like_mask_name(path: str | Path) -> bool:
    """A NIfTI whose name says it is a mask (``x_label.nii.gz``, ``x_spleen.nii.gz``, ...)."""
    return case_name(path).lower().endswith(MASK_SUFFIXES)


def is_label_array(array: np.ndarray, max_values: int = 64) -> bool:
    """Whether voxels look like a label map rather than CT: non-negative whole numbers, few of them.

    CT in Hounsfield units has air (about -1000 HU) around the body and hundreds of values.
    """
    a = np.asarray(array)
    if a.size == 0:
        return False
    if float(a.min()) < 0 or not 1 <= float(a.max()) <= 1000:
        return False
    sample = a.ravel()[:: max(1, a.size // 2_000_000)]  # a strided sample decides fast on big scans
    if not np.all(np.mod(sample, 1) == 0):
        return False
    return np.unique(sample).size <= max_values


def case_name(path: str | Path) -> str:
    """``/x/spleen_1.nii.gz`` -> ``spleen_1``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Volume:
    """A 3D image as read from disk: voxels (float32 unless asked otherwise) and its geometry."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (from the affine)."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))



# ----------------------------------------------------------------------------------------------
# the header guard: the 348-byte NIfTI-1 (540-byte NIfTI-2) header and its extension table are
# checked here, with bounded reads, before nibabel parses them. nibabel reads an extension whose
# size field is 7 or negative with ``read(-1)``: the whole (decompressed) file at once.

class NiftiHeaderError(DataError):
    """A NIfTI header refused before any voxel is read. ``kind`` (the service's error code):
    ``not_nifti`` (no NIfTI header at all), ``corrupt_nifti`` (truncated or damaged),
    ``bad_header`` (a field out of range), ``image_too_large``, ``unsupported_image`` (not 3D, an
    empty dimension, a non-numeric voxel type) or ``bad_geometry`` (a non-finite affine)."""

    def __init__(self, message: str, kind: str = "bad_header"):
        super().__init__(message)
        self.kind = kind


_NIFTI_HEADERS = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_DATATYPES = frozenset(int(c) for c in nib.nifti1.data_type_codes.code if isinstance(c, int) and c != 0)


def _read_upto(f, n: int) -> bytes:
    """At most ``n`` bytes (fewer only at the end of the stream); a gzip stream inflates no more."""
    parts, got = [], 0
    while got < n:
        block = f.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def check_nifti_stream(f, name: str, size: int | None = None) -> str:
    """Validate a NIfTI header and its extension table from ``f`` (positioned at the start).

    Reads at most the header, 4 bytes and :data:`MAX_EXTENSION_BYTES`. ``size`` is the stream's
    length when known (an uncompressed file). Returns ``"nifti1"`` or ``"nifti2"``; raises
    :class:`DataError` with one sentence for anything nibabel would choke on or read unboundedly.
    """
    raw = _read_upto(f, 348)
    order = next((o for o in "<>" if len(raw) >= 4 and int(np.frombuffer(raw[:4], o + "i4")[0]) in _NIFTI_HEADERS), None)
    if order is None:
        raise NiftiHeaderError(f"{name}: not a NIfTI file (its first bytes are not a NIfTI-1 or NIfTI-2 header).", "not_nifti")
    hsize = int(np.frombuffer(raw[:4], order + "i4")[0])
    klass = _NIFTI_HEADERS[hsize]
    kind = "nifti1" if hsize == 348 else "nifti2"
    if len(raw) == 348 and hsize > 348:
        raw += _read_upto(f, hsize - 348)
    if len(raw) < hsize:
        raise NiftiHeaderError(f"{name}: the file ends after {len(raw)} bytes, inside its NIfTI header; it is truncated.", "corrupt_nifti")
    h = np.frombuffer(raw[:hsize], dtype=klass.template_dtype.newbyteorder(order))[0]
    magic = bytes(h["magic"]).rstrip(b"\x00")
    if magic not in (klass.single_magic, klass.pair_magic):
        raise NiftiHeaderError(f"{name}: not a NIfTI file (the header's magic string is {magic[:8]!r}).", "not_nifti")
    if kind == "nifti2" and tuple(int(v) for v in h["eol_check"]) not in ((13, 10, 26, 10), (0, 0, 0, 0)):
        raise NiftiHeaderError(f"{name}: the NIfTI-2 header's end-of-line check bytes are wrong; the file was corrupted in transfer.")
    dim = [int(v) for v in h["dim"]]
    if not 1 <= dim[0] <= 7:
        raise NiftiHeaderError(f"{name}: the NIfTI header declares {dim[0]} dimensions; a NIfTI image has 1 to 7.")
    if min(dim[1 : dim[0] + 1]) < 0:
        raise NiftiHeaderError(f"{name}: the NIfTI header declares a negative size (dim {dim[1 : dim[0] + 1]}).")
    if int(h["datatype"]) not in _DATATYPES:
        raise NiftiHeaderError(f"{name}: the NIfTI header's voxel datatype code {int(h['datatype'])} is not a NIfTI datatype.")
    vox_offset = float(h["vox_offset"])
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise NiftiHeaderError(f"{name}: the NIfTI header's voxel offset ({vox_offset:g}) is negative or not a number.")
    vox_offset = int(vox_offset)
    if magic == klass.single_magic and 0 < vox_offset < klass.single_vox_offset:
        raise NiftiHeaderError(f"{name}: the NIfTI header's voxel offset ({vox_offset}) points inside the header itself.")
    if size is not None and vox_offset > size:
        raise NiftiHeaderError(f"{name}: the NIfTI header's voxel offset ({vox_offset}) lies beyond the end of the {size}-byte file; it is truncated or corrupt.")
    xforms = [("pixdim", h["pixdim"][1:4])]
    if int(h["qform_code"]) > 0:
        xforms.append(("qform", [h[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]))
    if int(h["sform_code"]) > 0:
        xforms.append(("sform", [*h["srow_x"], *h["srow_y"], *h["srow_z"]]))
    for what, values in xforms:
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            raise NiftiHeaderError(f"{name}: the NIfTI header's {what} holds NaN or infinite numbers.")

    flag = _read_upto(f, 4)
    if len(flag) < 4 or flag[0] == 0:
        return kind
    # as nibabel reads them: extensions until the voxel offset (to the end when the offset is 0)
    pos = hsize + 4
    remaining = vox_offset - pos
    total = 0
    while remaining >= 16 or remaining < 0:
        head = _read_upto(f, 8)
        if not head and remaining < 0:
            break
        if len(head) < 8:
            raise NiftiHeaderError(f"{name}: the file ends inside a NIfTI header extension; it is truncated or corrupt.", "corrupt_nifti")
        esize = int(np.frombuffer(head[:4], order + "i4")[0])
        if esize < 16 or esize % 16:
            raise NiftiHeaderError(f"{name}: a NIfTI header extension declares {esize} bytes; extension sizes are positive multiples of 16.")
        if remaining >= 0 and esize > remaining:
            raise NiftiHeaderError(f"{name}: a NIfTI header extension of {esize} bytes runs past the start of the voxel data (offset {vox_offset}).")
        if size is not None and pos + esize > size:
            raise NiftiHeaderError(f"{name}: a NIfTI header extension of {esize} bytes runs past the end of the {size}-byte file.")
        total += esize
        if total > MAX_EXTENSION_BYTES:
            raise NiftiHeaderError(f"{name}: the NIfTI header extensions take more than {MAX_EXTENSION_BYTES // (1 << 20)} MiB; this program accepts at most that much metadata.")
        if len(_read_upto(f, esize - 8)) < esize - 8:
            raise NiftiHeaderError(f"{name}: the file ends inside a NIfTI header extension; it is truncated or corrupt.", "corrupt_nifti")
        pos += esize
        if remaining >= 0:
            remaining -= esize
    return kind


def check_nifti_file(path: str | Path, name: str | None = None, gz: bool | None = None) -> str:
    """:func:`check_nifti_stream` on a file; ``gz`` (default: the name ends ``.gz``) decompresses
    only the header's bytes. The first step of :func:`read_header`."""
    path = Path(path)
    name = str(path) if name is None else name
    gz = str(path).endswith(".gz") if gz is None else gz
    try:
        if gz:
            with open(path, "rb") as raw:
                if raw.read(2) != b"\x1f\x8b":
                    raise NiftiHeaderError(f"{name}: not a NIfTI file (its name ends .gz, but it is not gzip-compressed).", "not_nifti")
            with gzip.open(path, "rb") as f:
                return check_nifti_stream(f, name)
        with open(path, "rb") as f:
            return check_nifti_stream(f, name, os.fstat(f.fileno()).st_size)
    except (EOFError, OSError, zlib.error):  # gzip.BadGzipFile is an OSError
        what = "gzip stream" if gz else "file"
        raise NiftiHeaderError(f"{name}: the {what} cannot be read up to the end of its NIfTI header; it is truncated, corrupt or not NIfTI.",
                               "corrupt_nifti") from None


def check_header(img: nib.spatialimages.SpatialImage, what: str, name: str, max_voxels: int = MAX_VOXELS) -> tuple[int, int, int]:
    """Validate dimensionality, size and voxel type from the header alone (no voxel read).

    Raises :class:`NiftiHeaderError` of kind ``image_too_large`` (more than ``max_voxels``, checked
    first) or ``unsupported_image`` (not 3D, an empty dimension, a non-numeric voxel type).
    """
    raw = tuple(int(s) for s in img.shape)
    declared = math.prod(raw)  # Python ints: a huge NIfTI-2 header cannot overflow
    if declared > max_voxels:
        raise NiftiHeaderError(f"{name}: the {what} header declares {'x'.join(map(str, raw))} = {declared:,} voxels; "
                               f"this program accepts at most {max_voxels:,}.", "image_too_large")
    shape = raw
    # a trailing singleton dimension (x, y, z, 1) is a 3D image written as 4D
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise NiftiHeaderError(f"{name}: the {what} is {len(shape)}D (shape {raw}); a 3D CT volume is needed.", "unsupported_image")
    if min(shape) < 1:
        raise NiftiHeaderError(f"{name}: the {what} has an empty dimension (shape {shape}).", "unsupported_image")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise NiftiHeaderError(f"{name}: the {what} has voxel type {dtype}; a numeric (integer or float) type is needed.",
                               "unsupported_image")
    return shape  # type: ignore[return-value]


def _gzip_head_is_short(path: Path, n: int) -> bool:
    """Whether a gzip file cannot give its first ``n`` bytes (cut or damaged before them)."""
    try:
        with gzip.open(path, "rb") as f:
            return len(f.read(n)) < n
    except (EOFError, OSError, zlib.error):
        return True


def read_header(path: str | Path, name: str | None = None, what: str = "image", gz: bool | None = None,
                max_voxels: int = MAX_VOXELS) -> tuple[nib.spatialimages.SpatialImage, tuple[int, int, int]]:
    """The header guard that :func:`load_nifti` and the service's upload reader share: the image
    (header parsed, no voxel read) and its 3D shape, once :func:`check_nifti_file`, nibabel's own
    parse, :func:`check_header` (with ``max_voxels``) and a finite affine have passed.

    Raises :class:`NiftiHeaderError` whose ``kind`` (``not_nifti``, ``corrupt_nifti``,
    ``bad_header``, ``image_too_large``, ``unsupported_image``, ``bad_geometry``) the service
    answers as its error code; messages start with ``name`` and hold no exception text.
    """
    path = Path(path)
    name = str(path) if name is None else name
    gz = str(path).endswith(".gz") if gz is None else gz
    check_nifti_file(path, name, gz=gz)  # header and extensions, bounded, before nibabel reads them
    try:
        img = nib.load(str(path))
    except nib.spatialimages.HeaderDataError:
        raise NiftiHeaderError(f"{name}: the NIfTI header is invalid (nibabel refuses its values).") from None
    except nib.filebasedimages.ImageFileError:
        if gz and _gzip_head_is_short(path, 348):
            raise NiftiHeaderError(f"{name}: the .nii.gz ends before its NIfTI header does; it is truncated or corrupt.",
                                   "corrupt_nifti") from None
        raise NiftiHeaderError(f"{name}: not a NIfTI file (nibabel cannot read its header).", "not_nifti") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, MemoryError, OverflowError):
        raise NiftiHeaderError(f"{name}: cannot read the NIfTI header; the file is truncated or corrupt.", "corrupt_nifti") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiHeaderError(f"{name}: is a {type(img).__name__}, not a NIfTI image.", "not_nifti")
    shape = check_header(img, what, name, max_voxels)
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except nib.spatialimages.HeaderDataError:
        raise NiftiHeaderError(f"{name}: the NIfTI header is invalid (nibabel cannot interpret its geometry).") from None
    if not np.isfinite(affine).all():
        raise NiftiHeaderError(f"{name}: the {what}'s affine (voxel to world) holds NaN or infinite numbers.", "bad_geometry")
    return img, shape


def load_nifti(path: str | Path, what: str = "image", dtype=np.float32) -> Volume:
    """Load a 3D NIfTI (any orientation, spacing, integer or float type, scaling slope).

    Raises :class:`DataError` with one sentence for a missing file, a file that is not NIfTI,
    a truncated or corrupt file, a 2D/4D image, a non-numeric voxel type or non-finite voxels.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file.")
    if path.is_dir():
        raise DataError(f"{name}: is a folder, not a NIfTI file.")
    img, shape = read_header(path, name, what)
    try:
        data = np.asanyarray(img.dataobj)
    except nib.spatialimages.HeaderDataError:
        raise DataError(f"{name}: the NIfTI header is invalid (nibabel cannot interpret its voxel type).") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DataError(f"{name}: cannot read the voxels ({type(e).__name__}); the file is truncated or corrupt.") from None
    data = np.asarray(data).reshape(shape)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{name}: the {what} contains NaN or infinite voxels.")
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty file next to ``path`` (same file system, so a rename is atomic).

    ``mkstemp`` makes files private (0600); an artifact should read like any other file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


def _process_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux); elsewhere
    the classic set-and-restore, done once at import, before any service thread exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: read once: flipping the umask while other threads create files would give them wrong modes
_UMASK = _process_umask()


def fsync_path(path: str | Path, directory: bool = False) -> None:
    """Flush a file's data (or a folder's entries) to the disk; a folder that cannot be opened
    for it (some file systems) is skipped."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path; on success it replaces ``path``, on failure it is removed.

    The data is flushed (``fsync``) before the rename and the folder after it, so a crash never
    leaves ``path`` naming an empty or half-written file.
    """
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def nifti_like(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """``array`` as a NIfTI image on ``affine``, keeping the qform/sform codes of ``header``; voxels
    are stored unscaled, in ``array``'s own type."""
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header=hdr)
    img.set_data_dtype(array.dtype)
    if hdr is not None:
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, header: nib.Nifti1Header | None = None) -> Path:
    """Write ``array`` with ``affine`` (and the codes of ``header``) atomically to ``path``."""
    path = Path(path)
    img = nifti_like(array, affine, header)
    with atomic_path(path, ".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return path


def save_mask(mask: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a uint8 label map on exactly the grid (shape and affine) of ``reference``."""
    if tuple(mask.shape) != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the reference grid {reference.shape}")
    return save_nifti(np.asarray(mask, dtype=np.uint8), reference.affine, path, header=reference.header)


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)
