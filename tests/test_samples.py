"""The real data shipped as package data: present, loadable, small, on-grid, the right way round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_utils import samples
from spleen_utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
MAX_BYTES = 5_000_000


@lru_cache(maxsize=None)
def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def _centroid_world(data: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


def _shipped_data_files() -> list[Path]:
    files = []
    for c in samples.real_cases():
        files += [c.image, c.label] + ([c.organs] if c.organs else [])
    for m in samples.label_maps():
        files += [m.path, m.path.with_name(m.path.name.replace(".nii.gz", ".labels.json"))]
    return files


def test_listing():
    assert [c.name for c in samples.real_cases()] == ["msd_spleen_8", "totalseg_ct_3mm"]
    assert {c.name: c.label_source for c in samples.real_cases()} == {
        "msd_spleen_8": "manual",
        "totalseg_ct_3mm": "model",
    }
    maps = {m.name: m for m in samples.label_maps()}
    assert set(maps) == {"s0327_label", "s0328_label", "amos_0013_label", "totalseg_ct_3mm_organs"}
    assert {n: m.scheme for n, m in maps.items()} == {
        "s0327_label": "totalseg",
        "s0328_label": "totalseg",
        "amos_0013_label": "amos",
        "totalseg_ct_3mm_organs": "totalseg",
    }
    for m in maps.values():
        assert m.labels[1] == "spleen"
        assert all(isinstance(k, int) for k in m.labels)
    assert maps["amos_0013_label"].value_of("liver") == 6
    assert maps["s0327_label"].value_of("liver") == 5
    assert samples.real_case("totalseg_ct_3mm").organs == maps["totalseg_ct_3mm_organs"].path
    assert samples.SAMPLES_DIR == Path(samples.__file__).resolve().parent


def test_files_exist_and_load_as_3d():
    for path in _shipped_data_files():
        assert path.is_file(), path
        assert path.parent == samples.SAMPLES_DIR
        if path.name.endswith(".nii.gz"):
            data, _ = _load(path)
            assert data.ndim == 3, path
        else:
            assert json.loads(path.read_text())["labels"]["1"] == "spleen"
    for name in ("README.md", "LICENSE-msd_spleen_8-CC-BY-SA-4.0.txt",
                 "LICENSE-totalseg_ct_3mm-Apache-2.0.txt", "LICENSE-labelmaps-CC-BY-4.0.txt"):
        assert (samples.SAMPLES_DIR / name).is_file(), name


def test_shipped_size_within_budget():
    files = [p for p in samples.SAMPLES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"{total} bytes shipped"


def test_shipped_files_not_git_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = [str(p.relative_to(ROOT)) for p in _shipped_data_files()]
    r = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "", f"git ignores: {r.stdout}"


@pytest.mark.parametrize("name", ["msd_spleen_8", "totalseg_ct_3mm"])
def test_real_case_labels_binary_nonempty_on_grid(name):
    case = samples.real_case(name)
    image, image_affine = _load(case.image)
    label, label_affine = _load(case.label)
    assert label.shape == image.shape
    assert np.allclose(label_affine, image_affine, atol=1e-4)
    assert set(np.unique(label).tolist()) == {0, 1}
    assert image.dtype == np.int16
    assert -1300 < image.min() < -900 and image.max() > 500  # Hounsfield units
    if case.organs is not None:
        organs, organs_affine = _load(case.organs)
        assert organs.shape == image.shape
        assert np.allclose(organs_affine, image_affine, atol=1e-4)
        assert np.array_equal(organs == 1, label == 1)  # spleen is class 1 of the organ map


def test_msd_spleen_on_patients_left():
    # nibabel's world is RAS+: x grows towards the patient's Right, so the patient's left is smaller x
    case = samples.real_case("msd_spleen_8")
    image, affine = _load(case.image)
    label, _ = _load(case.label)
    spleen_x = _centroid_world(label, affine, label == 1)[0]
    body_x = _centroid_world(image, affine, image > -300)[0]
    assert spleen_x < body_x - 30, (spleen_x, body_x)


@pytest.mark.parametrize("name", ["totalseg_ct_3mm_organs", "s0327_label", "s0328_label", "amos_0013_label"])
def test_spleen_left_liver_right(name):
    # The shared README: "the spleen lies on the patient's left and the liver on the right in world
    # coordinates"; in RAS+ world coordinates that is spleen x < liver x.
    m = samples.label_map(name)
    data, affine = _load(m.path)
    spleen_x = _centroid_world(data, affine, data == m.value_of("spleen"))[0]
    liver_x = _centroid_world(data, affine, data == m.value_of("liver"))[0]
    assert spleen_x < liver_x - 50, (spleen_x, liver_x)


@pytest.mark.parametrize("name", ["totalseg_ct_3mm_organs", "s0327_label", "s0328_label", "amos_0013_label"])
def test_label_maps_keep_every_spleen_voxel(name):
    m = samples.label_map(name)
    data, _ = _load(m.path)
    meta = json.loads(m.path.with_name(f"{name}.labels.json").read_text())
    assert int((data == 1).sum()) == meta["voxel_counts"]["spleen"]
    assert set(np.unique(data).tolist()) - {0} <= set(m.labels)
    assert data.dtype == (np.uint16 if m.scheme == "amos" else np.uint8)


@pytest.mark.parametrize(
    "shipped, original",
    [
        ("s0327_label.nii.gz", "labelmaps/s0327_label.nii.gz"),
        ("s0328_label.nii.gz", "labelmaps/s0328_label.nii.gz"),
        ("amos_0013_label.nii.gz", "labelmaps/amos_0013_label.nii.gz"),
        ("totalseg_ct_3mm_organs.nii.gz", "real/totalseg_ct_3mm_organs.nii.gz"),
        ("totalseg_ct_3mm_spleen.nii.gz", "real/totalseg_ct_3mm_spleen.nii.gz"),
        ("totalseg_ct_3mm_image.nii.gz", "real/totalseg_ct_3mm.nii.gz"),
        ("msd_spleen_8_image.nii.gz", "real/msd_spleen_8_image.nii.gz"),
    ],
)
def test_same_voxels_and_affine_as_shared_original(shipped, original):
    src = SHARED / original
    if not src.is_file():
        pytest.skip(f"shared original {src} absent")
    a, a_aff = _load(samples.SAMPLES_DIR / shipped)
    b, b_aff = _load(src)
    assert a.shape == b.shape
    assert np.array_equal(a_aff, b_aff)
    assert np.array_equal(a, b)
    assert int((a == 1).sum()) == int((b == 1).sum())


def test_unknown_sample_name_raises_data_error():
    with pytest.raises(DataError, match="msd_spleen_8"):
        samples.real_case("no_such_case")
    with pytest.raises(DataError, match="not be shipped"):
        samples.real_case("ircad_1")
    with pytest.raises(DataError, match="s0327_label"):
        samples.label_map("nope")


def test_validation_cases_honour_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path))
    assert samples.validation_cases() == []
    (tmp_path / "ircad_1_image.nii.gz").write_bytes(b"")
    (tmp_path / "ircad_1_spleen.nii.gz").write_bytes(b"")
    (case,) = samples.validation_cases()
    assert case.name == "ircad_1" and case.image.parent == tmp_path
    assert case.label_source == "manual" and case.licence == "CC-BY-NC-ND-4.0"


def test_validation_cases_default_to_shared(monkeypatch):
    monkeypatch.delenv("SPLEEN_REAL_DATA", raising=False)
    if not (SHARED / "real" / "ircad_1_image.nii.gz").is_file():
        assert samples.validation_cases() == []
        pytest.skip("../shared/data/real/ircad_1 absent")
    (case,) = samples.validation_cases()
    assert case.image == SHARED / "real" / "ircad_1_image.nii.gz"


def test_ircad_is_not_shipped():
    assert not list(samples.SAMPLES_DIR.glob("ircad*"))


def test_attribution_names_sources_and_licences():
    text = samples.attribution()
    for needle in ("Decathlon", "TotalSegmentator", "AMOS", "CC BY-SA 4.0", "Apache-2.0", "CC BY 4.0"):
        assert needle in text


def test_import_does_not_pull_torch():
    code = (
        "import sys, spleen_utils\n"
        "before = {m for m in ('numpy', 'nibabel') if m in sys.modules}\n"
        "import spleen_utils.samples as s\n"
        "eager = {m for m in ('numpy', 'nibabel') if m in sys.modules} - before\n"
        "assert not eager, eager\n"
        "s.real_cases(); s.label_maps(); s.validation_cases(); s.attribution()\n"
        "bad = [m for m in ('torch', 'monai') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPLEEN_REAL_DATA"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_real_data_dir_follows_the_environment(tmp_path, monkeypatch):
    from spleen_utils.samples import real_data_dir

    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path))
    assert real_data_dir() is None  # set, but holds no scan: not found (and no fall-back elsewhere)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(tmp_path / "x.nii.gz"))
    assert real_data_dir() == tmp_path
    assert real_data_dir("x.nii.gz") == tmp_path and real_data_dir("totalseg_ct_3mm.nii.gz") is None
    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path / "absent"))
    assert real_data_dir() is None
