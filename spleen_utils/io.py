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


def check_header(img: nib.spatialimages.SpatialImage, what: str, name: str) -> tuple[int, int, int]:
    """Validate dimensionality, size and voxel type from the header alone (no voxel read)."""
    shape = tuple(int(s) for s in img.shape)
    # a trailing singleton dimension (x, y, z, 1) is a 3D image written as 4D
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{name}: the {what} is {len(shape)}D (shape {tuple(img.shape)}); a 3D CT volume is needed.")
    if min(shape) < 1:
        raise DataError(f"{name}: the {what} has an empty dimension (shape {shape}).")
    if math.prod(shape) > MAX_VOXELS:  # Python ints: a huge NIfTI-2 header cannot overflow
        raise DataError(f"{name}: the {what} header declares {shape} voxels, more than this program accepts.")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{name}: the {what} has voxel type {dtype}; a numeric (integer or float) type is needed.")
    return shape  # type: ignore[return-value]


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
    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError:
        raise DataError(f"{name}: not a NIfTI file (nibabel cannot read its header).") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DataError(f"{name}: cannot read the NIfTI header ({type(e).__name__}: {e}); the file is corrupt or truncated.") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{name}: is a {type(img).__name__}, not a NIfTI image.")
    shape = check_header(img, what, name)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DataError(f"{name}: cannot read the voxels ({type(e).__name__}); the file is truncated or corrupt.") from None
    data = np.asarray(data).reshape(shape)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{name}: the {what} contains NaN or infinite voxels.")
    return Volume(array=data, affine=img.affine.astype(np.float64), header=img.header, path=path)


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty file next to ``path`` (same file system, so a rename is atomic).

    ``mkstemp`` makes files private (0600); an artifact should read like any other file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, header: nib.Nifti1Header | None = None) -> Path:
    """Write ``array`` with ``affine`` (and the codes of ``header``) atomically to ``path``."""
    path = Path(path)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header=hdr)
    img.set_data_dtype(array.dtype)
    if hdr is not None:
        # keep the reference's qform/sform codes; voxels are stored unscaled
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
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
