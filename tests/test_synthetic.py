"""The synthetic phantom generator: MSD layout, geometry, anatomy, determinism, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_utils import synthetic
from spleen_utils.errors import DataError
from spleen_utils.synthetic import (
    ORIENTATIONS,
    SPLEEN_VOLUME_ML,
    Tissue,
    case_seed,
    generate_case,
    make_phantom,
    write_synthetic_dataset,
)

SEED = 7
CASES, TEST_CASES = 3, 1
COARSE = (2.0, 2.0, 3.0)  # mm: fast phantoms for the checks that need many of them


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    assert mask.any()
    return nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_synthetic_dataset(root, cases=CASES, test_cases=TEST_CASES, seed=SEED, progress=False)


def test_layout_and_dataset_json_follow_msd(dataset):
    assert dataset.name == "Synthetic_Spleen"
    meta = json.loads((dataset / "dataset.json").read_text())
    for key in ("name", "description", "reference", "licence", "release"):
        assert isinstance(meta[key], str) and meta[key]
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "spleen"}
    assert meta["numTraining"] == CASES and meta["numTest"] == TEST_CASES
    assert meta["training"] == [
        {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in (1, 2, 3)
    ]
    assert meta["test"] == ["./imagesTs/spleen_4.nii.gz"]
    assert meta["synthetic"] == {
        "generator": "spleen_utils.synthetic",
        "seed": SEED,
        "cases": CASES,
        "test_cases": TEST_CASES,
        "version": synthetic.VERSION,
    }
    # exactly the listed files, nothing else (no temporary files, no labels for the test set)
    on_disk = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file())
    listed = sorted([v[2:] for e in meta["training"] for v in e.values()] + [t[2:] for t in meta["test"]] + ["dataset.json"])
    assert on_disk == listed
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]  # no partial folder left


def test_the_datalist_reader_accepts_it(dataset):
    from spleen_utils.data import load_datalist

    items = load_datalist(dataset)
    assert [Path(i["image"]).name for i in items] == [f"spleen_{i}.nii.gz" for i in (1, 2, 3)]
    assert all(Path(i["label"]).exists() for i in items)
    assert len(load_datalist(dataset, "test")) == TEST_CASES


def test_images_and_labels_share_their_grid(dataset):
    for i in range(1, CASES + TEST_CASES + 1):
        img = nib.load(str(dataset / ("imagesTr" if i <= CASES else "imagesTs") / f"spleen_{i}.nii.gz"))
        assert img.get_data_dtype() == np.int16
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert img.header.get_xyzt_units()[0] == "mm"
        arr = np.asanyarray(img.dataobj)
        assert arr.ndim == 3 and arr.dtype == np.int16
        assert -1024 <= arr.min() < -900 and arr.max() > 400  # air and bone are there
        if i > CASES:
            assert not (dataset / "labelsTr" / f"spleen_{i}.nii.gz").exists()
            continue
        lab = nib.load(str(dataset / "labelsTr" / f"spleen_{i}.nii.gz"))
        assert lab.get_data_dtype() == np.uint8
        assert lab.shape == img.shape
        np.testing.assert_array_equal(lab.affine, img.affine)
        np.testing.assert_array_equal(lab.header.get_qform(), img.header.get_qform())
        np.testing.assert_array_equal(lab.header.get_sform(), img.header.get_sform())
        assert int(lab.header["qform_code"]) == 1 and int(lab.header["sform_code"]) == 1
        values = np.unique(np.asanyarray(lab.dataobj))
        assert values.tolist() == [0, 1]


def test_files_hold_make_phantom_of_the_case_seed(dataset):
    img = nib.load(str(dataset / "imagesTr" / "spleen_2.nii.gz"))
    lab = nib.load(str(dataset / "labelsTr" / "spleen_2.nii.gz"))
    image, label, affine = make_phantom(case_seed(SEED, 2))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), image)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), label)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)


def test_geometry_varies_within_the_stated_ranges(dataset):
    codes, spacings = set(), []
    for i in range(1, CASES + TEST_CASES + 1):
        folder = "imagesTr" if i <= CASES else "imagesTs"
        img = nib.load(str(dataset / folder / f"spleen_{i}.nii.gz"))
        codes.add("".join(nib.aff2axcodes(img.affine)))
        zooms = np.asarray(img.header.get_zooms()[:3], float)
        spacings.append(zooms)
        lo, hi = synthetic.INPLANE_SPACING_MM
        assert lo - 1e-6 <= zooms[0] <= hi + 1e-6 and abs(zooms[0] - zooms[1]) < 1e-6
        lo, hi = synthetic.SLICE_SPACING_MM
        assert lo - 1e-6 <= zooms[2] <= hi + 1e-6
        extent = np.asarray(img.shape) * zooms
        assert 115 <= extent[2] <= 210  # z: the upper abdomen around the spleen
        assert 300 <= extent[0] <= 420 and 300 <= extent[1] <= 420  # in-plane: body + margin
        assert np.prod(img.shape) <= synthetic.MAX_VOXELS * 1.05
    assert codes == {"RAS", "LPS", "LAS"}  # three consecutive cases cycle the orientations
    assert len({tuple(np.round(s, 4)) for s in spacings}) == len(spacings)  # every case differs


@pytest.mark.parametrize("inplane, slice_mm, fov, z", [(0.6, 1.5, 400, 200), (0.6, 5.0, 400, 200), (1.0, 1.5, 310, 120), (0.8, 3.0, 350, 160)])
def test_spacing_is_coarsened_to_fit_the_voxel_budget(inplane, slice_mm, fov, z):
    sx, sy, sz = synthetic.header._capped_spacing(inplane, slice_mm, fov, z, synthetic.MAX_VOXELS)
    assert sx == sy and sx >= inplane and sz >= slice_mm
    assert synthetic.INPLANE_SPACING_MM[0] <= sx <= synthetic.INPLANE_SPACING_MM[1]
    assert synthetic.SLICE_SPACING_MM[0] <= sz <= synthetic.SLICE_SPACING_MM[1]
    voxels = (fov / sx) ** 2 * z / sz
    assert voxels <= synthetic.MAX_VOXELS * 1.001 or (sx, sz) == (1.0, 5.0)
    if (fov / inplane) ** 2 * z / slice_mm <= synthetic.MAX_VOXELS:
        assert (sx, sz) == (inplane, slice_mm)  # what fits is kept as drawn


def test_default_set_contains_all_orientations():
    # the default 12 + 3 cases, without building them: orientation cycles with the case seed
    for seed in (0, 1, 5):
        codes = {ORIENTATIONS[case_seed(seed, i) % len(ORIENTATIONS)] for i in range(1, 13)}
        assert codes == {"RAS", "LPS", "LAS"}


def test_deterministic_per_seed():
    a = make_phantom(11, spacing=COARSE)
    b = make_phantom(11, spacing=COARSE)
    c = make_phantom(12, spacing=COARSE, orientation="LPS")
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[2].shape == (4, 4)
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != c[1].tobytes()
    # spacing and orientation sample the same anatomy: the spleen of seed 11 stays put
    fine = generate_case(11, spacing=(1.0, 1.0, 2.0))
    coarse = generate_case(11, spacing=COARSE)
    np.testing.assert_allclose(
        world_centroid(fine.label > 0, fine.affine), world_centroid(coarse.label > 0, coarse.affine), atol=2.0
    )
    assert abs(fine.spleen_ml - coarse.spleen_ml) < 0.1 * fine.spleen_ml


def test_anatomy_is_the_same_in_every_storage_orientation():
    cases = {code: generate_case(21, orientation=code, spacing=(1.5, 1.5, 4.0)) for code in ("RAS", "LPS", "LAS", "PIR")}
    ras = cases["RAS"]
    for code, p in cases.items():
        assert "".join(nib.aff2axcodes(p.affine)) == code
        spleen = world_centroid(p.label > 0, p.affine)
        liver = world_centroid(p.tissues == Tissue.LIVER, p.affine)
        np.testing.assert_allclose(spleen, world_centroid(ras.label > 0, ras.affine), atol=1e-3)
        assert spleen[0] < 0 and spleen[1] < 0  # patient's left, posterior
        assert liver[0] > 0  # patient's right
        # back to canonical: the very same voxels and affine
        canon = nib.as_closest_canonical(nib.Nifti1Image(p.image, p.affine))
        np.testing.assert_array_equal(np.asanyarray(canon.dataobj), ras.image)
        np.testing.assert_allclose(canon.affine, ras.affine, atol=1e-4)


@pytest.mark.parametrize("seed", range(100, 112))
def test_spleen_position_size_and_intensity(seed):
    p = generate_case(seed, spacing=COARSE)
    spleen = p.label > 0
    # size within the stated range, inside the field of view
    assert SPLEEN_VOLUME_ML[0] <= p.spleen_ml <= SPLEEN_VOLUME_ML[1]
    for axis in range(3):
        assert not np.take(spleen, [0, -1], axis=axis).any()
    # where: patient's left and posterior, superior to the left kidney, lateral to the spine
    c_spleen = world_centroid(spleen, p.affine)
    c_liver = world_centroid(p.tissues == Tissue.LIVER, p.affine)
    kidneys = np.argwhere(np.isin(p.tissues, [Tissue.KIDNEY_CORTEX, Tissue.KIDNEY_MEDULLA]))
    kidney_world = nib.affines.apply_affine(p.affine, kidneys)
    left_kidney = kidney_world[kidney_world[:, 0] < 0].mean(axis=0)
    assert c_spleen[0] < -40 and c_spleen[1] < 0
    assert c_liver[0] > 0 and c_spleen[1] < c_liver[1]
    assert c_spleen[2] > left_kidney[2]
    # the spleen touches no bone and no lung
    touching = np.isin(p.tissues, [Tissue.BONE_CORTEX, Tissue.BONE_CANCELLOUS, Tissue.RIB_CORTEX, Tissue.LUNG])
    assert not (touching & spleen).any()
    # intensity alone cannot tell spleen from liver
    liver = p.tissues == Tissue.LIVER
    hu_spleen = p.image[spleen].astype(float)
    hu_liver = p.image[liver].astype(float)
    assert abs(hu_spleen.mean() - hu_liver.mean()) < 20
    assert 60 < hu_spleen.mean() < 160 and 60 < hu_liver.mean() < 160
    lo, hi = np.percentile(hu_spleen, [10, 90])
    assert ((hu_liver > lo) & (hu_liver < hi)).mean() > 0.5
    # noise and texture: not a flat cartoon
    assert hu_spleen.std() > 8


def test_idempotent_and_never_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic.header, "MAX_VOXELS", 1_000_000)  # coarser cases, same logic: faster
    root = tmp_path / "data"
    first = write_synthetic_dataset(root, cases=1, test_cases=0, seed=3, progress=False)
    files = sorted(p for p in first.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    # the same request again: nothing is rewritten
    assert write_synthetic_dataset(root, cases=1, test_cases=0, seed=3, progress=False) == first
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # a run that fails half-way leaves the complete older set untouched and no partial folder
    real = synthetic.generate_case  # what the writer calls for each phantom
    calls = []

    def failing(seed, *args, **kwargs):
        calls.append(seed)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(seed, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(synthetic.dataset, "generate_case", failing)
        with pytest.raises(KeyboardInterrupt):
            write_synthetic_dataset(root, cases=1, test_cases=1, seed=3, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert json.loads((first / "dataset.json").read_text())["synthetic"]["test_cases"] == 0
    assert sorted(p.name for p in root.iterdir()) == ["Synthetic_Spleen"]

    # a different request replaces the set, once complete
    second = write_synthetic_dataset(root, cases=1, test_cases=0, seed=4, progress=False)
    assert second == first
    assert json.loads((second / "dataset.json").read_text())["synthetic"]["seed"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["Synthetic_Spleen"]
    image_now = np.asanyarray(nib.load(str(second / "imagesTr" / "spleen_1.nii.gz")).dataobj)
    np.testing.assert_array_equal(image_now, make_phantom(case_seed(4, 1))[0])

    # a missing file makes the set incomplete: it is written again
    (second / "labelsTr" / "spleen_1.nii.gz").unlink()
    write_synthetic_dataset(root, cases=1, test_cases=0, seed=4, progress=False)
    assert (second / "labelsTr" / "spleen_1.nii.gz").exists()


def test_never_replaces_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "Synthetic_Spleen"
    foreign.mkdir()
    (foreign / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": []}))
    with pytest.raises(DataError, match="not written by"):
        write_synthetic_dataset(tmp_path, cases=1, test_cases=0, progress=False)
    assert json.loads((foreign / "dataset.json").read_text())["name"] == "Spleen"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Synthetic_Spleen"]


def test_bad_arguments():
    with pytest.raises(DataError):
        write_synthetic_dataset("unused", cases=0, progress=False)
    with pytest.raises(DataError):
        write_synthetic_dataset("unused", seed=-1, progress=False)
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(0, orientation="XYZ")
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, spacing=(1.0, -1.0, 2.0))
    with pytest.raises(ValueError, match="coarser"):
        make_phantom(0, spacing=(0.1, 0.1, 0.1))
    assert not Path("unused").exists()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """The quick profile's kind of set: phantoms and label-map cases, tissue maps, folds."""
    root = tmp_path_factory.mktemp("mixed")
    return write_synthetic_dataset(root, cases=2, test_cases=1, seed=SEED, name="Mixed", progress=False,
                                   labelmap_cases=1, val_per_source=1)


@pytest.mark.slow
def test_mixed_set_has_tissue_maps_sources_and_folds(mixed):
    from spleen_utils.data import load_datalist, split_datalist
    from spleen_utils.samples import label_maps

    meta = json.loads((mixed / "dataset.json").read_text())
    maps = [m.name for m in label_maps()]
    assert [e["source"] for e in meta["training"]] == ["phantom", "phantom"] + [f"labelmap:{m}" for m in maps]
    # the last case of each source validates: one phantom, and every single label-map case
    assert [e["fold"] for e in meta["training"]] == ["training", "validation"] + ["validation"] * len(maps)
    assert meta["synthetic"]["labelmap_cases"] == 1 and meta["synthetic"]["val_per_source"] == 1
    items = load_datalist(mixed)
    for item in items:
        img, lab, tis = (nib.load(item[k]) for k in ("image", "label", "tissue"))
        assert img.shape == lab.shape == tis.shape and np.allclose(img.affine, tis.affine)
        t, y = np.asarray(tis.dataobj), np.asarray(lab.dataobj)
        assert np.array_equal(y, (t == Tissue.SPLEEN).astype(y.dtype)) and y.any()
    train, val = split_datalist(items, val_cases=99)  # folds win over the count rule
    assert len(train) == 1 and len(val) == 1 + len(maps)
    # idempotent: the same request finds the set complete and writes nothing
    before = (mixed / "dataset.json").stat().st_mtime_ns
    write_synthetic_dataset(mixed.parent, cases=2, test_cases=1, seed=SEED, name="Mixed", progress=False,
                            labelmap_cases=1, val_per_source=1)
    assert (mixed / "dataset.json").stat().st_mtime_ns == before
