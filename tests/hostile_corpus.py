"""A small hostile NIfTI corpus, written byte by byte, for the readers of the CLI, the service and
the C++ program (issue #9). Not a test module: ``tests/test_io.py``, ``tests/test_infer.py`` and
``tests/test_cpp.py`` import it.

Each case is a file and the words its one-sentence refusal must contain. ``header`` cases are
refused while reading; ``geometry`` cases are well-formed files whose grid on the recipe's spacing
would be absurd, refused before resampling.
"""

from __future__ import annotations

import gzip
import resource
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

#: zeros after the voxels of the extension cases: a reader that reads "the rest of the stream"
#: (nibabel with an extension size of 7 or -16) allocates this much; gzip packs it into ~60 KB
BLOAT_BYTES = 64 << 20


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    kind: str  # "header" (refused on reading) or "geometry" (refused before resampling)
    match: str  # a regular expression the refusal must match


def ct_block(shape=(16, 16, 16), seed: int = 0) -> np.ndarray:
    """int16 'CT' with a bright middle (foreground for the pipeline), air around it."""
    a = np.full(shape, -1000, np.int16)
    sl = tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)
    a[sl] = np.random.default_rng(seed).integers(0, 150, a[sl].shape).astype(np.int16)
    return a


def extension(esize: int, content_len: int | None = None, ecode: int = 6) -> bytes:
    """One NIfTI extension: its 8-byte head (``esize``, ``ecode``) and ``content_len`` bytes."""
    n = max(esize - 8, 0) if content_len is None else content_len
    return struct.pack("<ii", esize, ecode) + b"x" * n


def nifti1_bytes(data: np.ndarray, zooms=(1.0, 1.0, 1.0), *, ext: bytes = b"", flag: bytes | None = None,
                 vox_offset: float | None = None, tail: bytes = b"", nifti2: bool = False, **fields) -> bytes:
    """A single-file NIfTI-1 (or NIfTI-2) written by hand: header (fields patched after nibabel
    fills them), extension flag, extensions, voxels, then ``tail``."""
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr.set_zooms(tuple(float(z) for z in zooms))
    aff = np.diag([*(float(z) for z in zooms), 1.0])
    hdr.set_sform(aff, code=1)
    try:
        with np.errstate(all="ignore"):
            hdr.set_qform(aff, code=1)
    except nib.spatialimages.HeaderDataError:  # a zero voxel size has no quaternion: sform only
        hdr.set_qform(None, code=0)
    block = np.frombuffer(hdr.binaryblock, dtype=hdr.structarr.dtype).copy()
    block["magic"] = b"n+2" if nifti2 else b"n+1"
    block["vox_offset"] = (544 if nifti2 else 352) + len(ext) if vox_offset is None else vox_offset
    for k, v in fields.items():
        block[k] = v
    if flag is None:
        flag = b"\x01\x00\x00\x00" if ext else b"\x00\x00\x00\x00"
    return block.tobytes() + flag + ext + np.ascontiguousarray(data).tobytes() + tail


def write(folder: Path, name: str, raw: bytes, gz: bool) -> Path:
    path = folder / (name + (".nii.gz" if gz else ".nii"))
    path.write_bytes(gzip.compress(raw, compresslevel=6) if gz else raw)
    return path


def hostile_corpus(folder: Path, geometry: bool = True) -> list[Case]:
    """Write the corpus into ``folder``; returns its cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = ct_block()
    bloat = b"\x00" * BLOAT_BYTES
    cases: list[Case] = []

    def add(name, raw, kind, match, gz=True):
        cases.append(Case(name, write(folder, name, raw, gz), kind, match))

    ext_words = r"extension"
    # extension tables (the 306 KB .nii.gz that took the server from 69 to 677 MiB was of this kind)
    add("ext_size_7", nifti1_bytes(d, ext=extension(7, 8), tail=bloat, vox_offset=368), "header", ext_words)
    add("ext_size_negative", nifti1_bytes(d, ext=extension(-16, 8), tail=bloat, vox_offset=368), "header", ext_words)
    add("ext_size_24", nifti1_bytes(d, ext=extension(24, 24 - 8), tail=bloat, vox_offset=384), "header", ext_words)
    add("ext_size_beyond_file", nifti1_bytes(d, ext=extension(1 << 30, 8)), "header", ext_words, gz=False)
    add("ext_size_beyond_vox_offset", nifti1_bytes(d, ext=extension(1 << 20, 8), vox_offset=368, tail=bloat), "header", ext_words)
    big = (2 << 20) + 16  # one 2 MiB extension, over the 1 MiB cap
    add("ext_over_cap", nifti1_bytes(d, ext=extension(big)), "header", r"MiB")
    add("ext_flag_offset_0", nifti1_bytes(d, ext=extension(16, 8), vox_offset=0, tail=bloat), "header", ext_words)
    add("ext_truncated", nifti1_bytes(d, ext=extension(1024, 8), vox_offset=352 + 1024)[: 352 + 16], "header", r"ends inside|truncated|corrupt")
    add("nifti2_ext_size_7", nifti1_bytes(d, ext=extension(7, 8), tail=bloat, vox_offset=560, nifti2=True), "header", ext_words)
    add("nifti2_bad_datatype", nifti1_bytes(d, datatype=17, nifti2=True), "header", r"datatype")
    # header fields
    add("bad_datatype", nifti1_bytes(d, datatype=17, bitpix=16), "header", r"datatype")
    add("negative_vox_offset", nifti1_bytes(d, vox_offset=-352), "header", r"voxel offset")
    add("nan_vox_offset", nifti1_bytes(d, vox_offset=float("nan")), "header", r"voxel offset")
    add("vox_offset_inside_header", nifti1_bytes(d, vox_offset=100), "header", r"voxel offset")
    add("vox_offset_beyond_file", nifti1_bytes(d, vox_offset=1 << 40), "header", r"voxel offset|beyond", gz=False)
    add("negative_dim", nifti1_bytes(d, dim=[3, 16, -16, 16, 1, 1, 1, 1]), "header", r"negative|dimension")
    add("dim0_9", nifti1_bytes(d, dim=[9, 16, 16, 16, 1, 1, 1, 1]), "header", r"dimensions")
    add("nan_sform", nifti1_bytes(d, srow_x=[float("nan"), 0, 0, 0], qform_code=0), "header", r"NaN|infinite|not finite")
    add("bad_magic", nifti1_bytes(d, magic=b"xyz"), "header", r"not a NIfTI|magic")
    add("truncated_header", nifti1_bytes(d)[:200], "header", r"truncated|corrupt|ends")
    add("truncated_voxels", nifti1_bytes(d)[:352 + 1000], "header", r"truncated|corrupt")
    raw_gz = gzip.compress(nifti1_bytes(d))
    (folder / "truncated_gzip.nii.gz").write_bytes(raw_gz[: len(raw_gz) // 2])
    cases.append(Case("truncated_gzip", folder / "truncated_gzip.nii.gz", "header", r"truncated|corrupt"))
    if geometry:
        # well-formed files whose grid on the recipe's spacing is absurd
        add("spacing_400mm_16cube", nifti1_bytes(d, zooms=(400.0, 400.0, 400.0)), "geometry", r"voxel size|voxels")
        add("spacing_1.6e7mm_2cube", nifti1_bytes(ct_block((2, 2, 2)) + 100, zooms=(1.6e7,) * 3), "geometry",
            r"voxel size|voxels")
        add("spacing_90mm_64cube", nifti1_bytes(ct_block((64, 64, 64)), zooms=(90.0, 90.0, 90.0)), "geometry",
            r"would become .* voxels")
        add("spacing_zero", nifti1_bytes(d, zooms=(1.0, 0.0, 1.0)), "geometry", r"voxel size|degenerate|affine")
    return cases


def measure(fn) -> tuple[float, int, BaseException | None]:
    """(seconds, peak traced bytes, exception) of calling ``fn()``; numpy's buffers are traced."""
    tracemalloc.start()
    t0 = time.perf_counter()
    err = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the caller checks the type
        err = e
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dt, peak, err


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
