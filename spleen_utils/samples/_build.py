"""Regenerate the shipped sample files from the shared data folders, so the shipping is auditable.

Run by hand, never at import::

    python -m spleen_utils.samples._build ../shared/data/real ../shared/data/labelmaps spleen_utils/samples

What it does, file by file (nothing is cropped, no label value changes):

* ``msd_spleen_8_image/label``, the ``.labels.json`` files and the licence texts: copied byte for byte.
* ``totalseg_ct_3mm_image``: ``real/totalseg_ct_3mm.nii.gz`` with its int32 voxels stored as int16
  (every value, -1207..3382, fits); same voxels, same affine, same header otherwise.
* ``totalseg_ct_3mm_spleen``, ``totalseg_ct_3mm_organs`` and the three label maps: the same
  uncompressed NIfTI bytes, re-gzipped at level 9 (the shared copies use level 1) with a zero
  timestamp, so a rebuild gives identical files.

``LICENSE-labelmaps-CC-BY-4.0.txt`` (the CC BY 4.0 legal code) has no copy in the shared folders;
it is kept in the package and copied along when ``dst`` is another folder.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

#: the most the shipped files may weigh together (bytes)
MAX_BYTES = 5_000_000

COPIED_REAL = [
    "msd_spleen_8_image.nii.gz",
    "msd_spleen_8_label.nii.gz",
    "LICENSE-msd_spleen_8-CC-BY-SA-4.0.txt",
    "LICENSE-totalseg_ct_3mm-Apache-2.0.txt",
    "totalseg_ct_3mm_organs.labels.json",
]
COPIED_LABELMAPS = [
    "s0327_label.labels.json",
    "s0328_label.labels.json",
    "amos_0013_label.labels.json",
    "licence_evidence_pyvista_whole_body_ct_README.md",
]
#: (source folder key, source name, shipped name): same .nii bytes, recompressed
REGZIPPED = [
    ("real", "totalseg_ct_3mm_spleen.nii.gz", "totalseg_ct_3mm_spleen.nii.gz"),
    ("real", "totalseg_ct_3mm_organs.nii.gz", "totalseg_ct_3mm_organs.nii.gz"),
    ("labelmaps", "s0327_label.nii.gz", "s0327_label.nii.gz"),
    ("labelmaps", "s0328_label.nii.gz", "s0328_label.nii.gz"),
    ("labelmaps", "amos_0013_label.nii.gz", "amos_0013_label.nii.gz"),
]
CC_BY_TEXT = "LICENSE-labelmaps-CC-BY-4.0.txt"


def _gzip(raw: bytes, path: Path) -> None:
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def _ct_as_int16(src: Path, dst: Path) -> None:
    import nibabel as nib
    import numpy as np

    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    info = np.iinfo(np.int16)
    if data.min() < info.min or data.max() > info.max:
        raise ValueError(f"{src} holds values outside int16 ({data.min()}..{data.max()})")
    hdr = img.header.copy()
    hdr.set_data_dtype(np.int16)
    out = nib.Nifti1Image(data.astype(np.int16), img.affine, hdr)
    _gzip(out.to_bytes(), dst)
    # audit: same voxels, same affine, same header apart from the dtype
    back = nib.load(dst)
    assert back.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(back.dataobj), data)
    assert np.array_equal(back.affine, img.affine)
    for key in ("dim", "pixdim", "qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        assert np.array_equal(back.header[key], img.header[key]), key


def build(src_real: str | Path, src_labelmaps: str | Path, dst: str | Path) -> dict[str, int]:
    """Write every shipped data file into ``dst`` from the shared folders; return name -> bytes."""
    src = {"real": Path(src_real), "labelmaps": Path(src_labelmaps)}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED_REAL:
        shutil.copyfile(src["real"] / name, dst / name)
    for name in COPIED_LABELMAPS:
        shutil.copyfile(src["labelmaps"] / name, dst / name)
    for key, name, out in REGZIPPED:
        with gzip.open(src[key] / name, "rb") as f:
            _gzip(f.read(), dst / out)
    _ct_as_int16(src["real"] / "totalseg_ct_3mm.nii.gz", dst / "totalseg_ct_3mm_image.nii.gz")
    here = Path(__file__).resolve().parent
    if (dst / CC_BY_TEXT).resolve() != (here / CC_BY_TEXT).resolve():
        shutil.copyfile(here / CC_BY_TEXT, dst / CC_BY_TEXT)
    sizes = {p.name: p.stat().st_size for p in sorted(dst.iterdir()) if p.is_file()}
    total = sum(sizes.values())
    if total > MAX_BYTES:
        raise ValueError(f"the samples weigh {total} bytes, more than {MAX_BYTES}")
    return sizes


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m spleen_utils.samples._build SRC_REAL SRC_LABELMAPS DST")
    for name, size in build(*sys.argv[1:]).items():
        print(f"{size:>10,}  {name}")
