"""The Predictor: masks on the input's exact grid, the default path equal to MONAI's transforms, errors.

Two kinds of model:

* a *box* backend, a 3x3x3 mean filter (logits ``0.5 - m`` and ``m - 0.5``): deterministic and
  position-sensitive, so equal masks from two pipelines mean equal geometry (window, crop,
  orientation, spacing, inversion). It needs no weights.
* a small random-weights UNet checkpoint (tiny channels) for the file, backend and precision
  plumbing.
"""

from __future__ import annotations

import gzip
import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from spleen_utils.config import Recipe
from spleen_utils.errors import DataError, SpleenError
from spleen_utils.infer import Predictor
from spleen_utils.preprocess import prepare, resample_linear
from spleen_utils.io import load_nifti
from spleen_utils.metrics import dice
from spleen_utils.model import build_network, save_checkpoint
from spleen_utils.synthetic import make_phantom
from spleen_utils.transforms import inference_transforms

TINY = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)
BOX_W = torch.zeros(2, 1, 3, 3, 3)
BOX_W[0], BOX_W[1] = -1.0 / 27, 1.0 / 27
BOX_B = torch.tensor([0.5, -0.5])


class BoxBackend:
    """A 3x3x3 mean filter as a two-class 'network' (any spatial size)."""

    name = "box"
    device = torch.device("cpu")
    precision = "fp32"
    meta: dict = {}

    def __init__(self, recipe: Recipe = Recipe()):
        self.recipe = recipe
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return torch.nn.functional.conv3d(x, BOX_W, BOX_B, padding=1)


def write(path, array, affine, slope=None, inter=None):
    img = nib.Nifti1Image(array, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(build_network(TINY), TINY, tmp_path_factory.mktemp("infer") / "tiny.pt")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """The same synthetic anatomy stored as RAS, LPS and LAS (4 x 4 x 5 mm voxels)."""
    d = tmp_path_factory.mktemp("phantoms")
    out = {}
    for codes in ("RAS", "LPS", "LAS"):
        img, lab, aff = make_phantom(3, codes, (4.0, 4.0, 5.0))
        out[codes] = write(d / f"{codes}.nii.gz", img, aff)
    return out


def geometry_of(path):
    img = nib.load(str(path))
    return img.shape, img.affine


def assert_same_grid(mask_path, image_path):
    (ms, ma), (s, a) = geometry_of(mask_path), geometry_of(image_path)
    assert ms == s
    np.testing.assert_allclose(ma, a, atol=1e-4)
    assert nib.load(str(mask_path)).get_data_dtype() == np.uint8


# ----------------------------------------------------------------------------------------------
# the default path computes what MONAI's transforms compute


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS"])
def test_preprocessing_equals_monai_transforms(phantoms, codes):
    vol = load_nifti(phantoms[codes])
    prep = prepare(vol, Recipe())
    ref = inference_transforms(Recipe())({"image": MetaTensor(torch.from_numpy(vol.array.copy())[None], affine=torch.as_tensor(vol.affine))})["image"]
    assert tuple(prep.image.shape) == tuple(ref.shape[1:])
    np.testing.assert_allclose(prep.affine, ref.affine.numpy(), atol=1e-6)
    assert isinstance(prep.image, np.ndarray) and prep.image.dtype == np.float32
    assert float(np.abs(prep.image - ref.as_tensor()[0].numpy()).max()) < 1e-5


def test_resample_linear_is_grid_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(9, 7, 5, generator=g)
    pos = [torch.linspace(-1.2, 9.5, 13), None, torch.linspace(0.3, 3.7, 4)]
    got = torch.from_numpy(resample_linear(x.numpy().copy(), [None if p is None else p.numpy() for p in pos]))
    # the same sampling with grid_sample (x, y, z reversed; align_corners=True maps indices exactly)
    px, py, pz = torch.meshgrid(pos[0], torch.arange(7.0), pos[2], indexing="ij")
    norm = lambda p, n: 2 * p / (n - 1) - 1  # noqa: E731
    grid = torch.stack([norm(pz, 5), norm(py, 7), norm(px, 9)], dim=-1)[None].float()
    want = torch.nn.functional.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    assert got.shape == (13, 7, 4)
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS"])
def test_default_path_mask_equals_monai_path(phantoms, codes):
    """Same windows (sliding) on both: the fast geometry gives MONAI's mask voxel for voxel."""
    vol = load_nifti(phantoms[codes])
    fast, _ = Predictor(BoxBackend(), lcc=False, window="sliding").predict_volume(vol)
    ref, _ = Predictor(BoxBackend(), lcc=False, window="sliding", preprocess="monai").predict_volume(vol)
    assert fast.shape == vol.shape and fast.sum() > 100 and (fast == 0).sum() > 100
    assert int((fast != ref).sum()) <= max(1, int(1e-4 * fast.size))


def test_orientations_give_the_same_anatomy(phantoms, tmp_path):
    """One phantom stored three ways: every mask fits its own file, and they agree in world space."""
    masks = {}
    p = Predictor(BoxBackend(), lcc=True)
    for codes, path in phantoms.items():
        out = tmp_path / f"{codes}_mask.nii.gz"
        p.predict_file(path, out)
        assert_same_grid(out, path)
        img = nib.load(str(out))
        masks[codes] = np.asarray(nib.as_closest_canonical(img).dataobj)
    assert masks["RAS"].sum() > 100
    assert dice(masks["RAS"], masks["LPS"]) > 0.99 and dice(masks["RAS"], masks["LAS"]) > 0.99


def test_auto_runs_the_tutorials_windows(phantoms):
    """Within the ROI: one window padded to the ROI, the very window MONAI's sliding window runs."""
    coarse = Recipe(pixdim=(3.0, 3.0, 4.0))  # the phantom (~36 cm) fits in 160 voxels of 3 mm
    vol = load_nifti(phantoms["LPS"])
    box = BoxBackend(coarse)
    one, _ = Predictor(box, lcc=False).predict_volume(vol)
    assert box.shapes == [(1, 1, 160, 160, 160)]
    ref, _ = Predictor(BoxBackend(coarse), lcc=False, window="sliding").predict_volume(vol)
    assert one.sum() > 100 and np.array_equal(one, ref)
    # larger than the ROI (1.5 mm): MONAI's overlapping windows, batches of sw_batch_size
    box = BoxBackend()
    Predictor(box, lcc=False).predict_volume(vol)
    assert sum(s[0] for s in box.shapes) >= 2 and all(s[1:] == (1, 160, 160, 160) and s[0] <= 4 for s in box.shapes)


def test_whole_window_is_one_padded_call(phantoms):
    vol = load_nifti(phantoms["RAS"])
    box = BoxBackend()
    p = Predictor(box, lcc=False, window="whole")
    mask, _ = p.predict_volume(vol)
    shape = prepare(vol, Recipe()).image.shape
    assert len(box.shapes) == 1 and all(s % 16 == 0 and s >= max(n, 160) for s, n in zip(box.shapes[0][2:], shape))
    assert p.window_plan(shape) == "whole" and Predictor(BoxBackend()).window_plan(shape) == "sliding"
    # a mean filter differs between one window and overlapping windows only at window borders
    sliding, _ = Predictor(BoxBackend(), lcc=False, window="sliding").predict_volume(vol)
    assert dice(mask, sliding) > 0.99


def test_window_policy_falls_back_to_sliding():
    p = Predictor(BoxBackend(), max_window_voxels=1000)
    assert p.window_plan((100, 100, 50)) == "sliding"
    assert Predictor(BoxBackend()).window_plan((100, 100, 50)) == "whole"
    assert Predictor(BoxBackend()).window_plan((161, 100, 50)) == "sliding"  # beyond the ROI
    assert Predictor(BoxBackend(), window="sliding").window_plan((16, 16, 16)) == "sliding"
    engine_like = BoxBackend()
    engine_like.profile = ((1, 1, 64, 64, 64), (8, 1, 160, 160, 160))  # a TensorRT engine's profile
    assert Predictor(engine_like).window_plan((150, 150, 100)) == "whole"
    assert Predictor(engine_like).window_plan((200, 150, 100)) == "sliding"
    with pytest.raises(SpleenError):
        Predictor(BoxBackend(), window="tiles")


def test_sheared_affine_takes_the_generic_path(tmp_path):
    img, _, aff = make_phantom(1, "RAS", (4.0, 4.0, 5.0))
    shear = aff.copy()
    shear[0, 1] = 1.0  # non-orthogonal axes: MONAI's generic resampling
    path = write(tmp_path / "shear.nii.gz", img, shear)
    vol = load_nifti(path)
    assert prepare(vol, Recipe()) == "generic"
    out = tmp_path / "mask.nii.gz"
    Predictor(BoxBackend()).predict_file(path, out)
    assert_same_grid(out, path)


def test_air_only_gives_an_empty_mask(tmp_path):
    path = write(tmp_path / "air.nii.gz", np.full((20, 18, 16), -1000, np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    rec = Predictor(BoxBackend()).predict_file(path, tmp_path / "m.nii.gz")
    assert rec["spleen_voxels"] == 0
    assert_same_grid(tmp_path / "m.nii.gz", path)


# ----------------------------------------------------------------------------------------------
# voxel types, files and folders, a real network


def test_int_float_and_scaled_inputs_agree(tmp_path):
    img, _, aff = make_phantom(2, "LPS", (4.0, 4.0, 5.0))
    files = {
        "int16": write(tmp_path / "i.nii.gz", img.astype(np.int16), aff),
        "float32": write(tmp_path / "f.nii", img.astype(np.float32), aff),
        # stored = (HU + 1024) / 2 as uint16, scl_slope 2, scl_inter -1024: the same HU after scaling
        "scaled": write(tmp_path / "s.nii.gz", ((img.astype(np.int32) + 1024) // 2).astype(np.uint16), aff, slope=2.0, inter=-1024.0),
    }
    p = Predictor(BoxBackend())
    masks = {}
    for k, f in files.items():
        out = tmp_path / f"{k}_mask.nii.gz"
        p.predict_file(f, out)
        assert_same_grid(out, f)
        masks[k] = np.asarray(nib.load(str(out)).dataobj)
    assert masks["int16"].sum() > 100
    assert np.array_equal(masks["int16"], masks["float32"])
    assert dice(masks["int16"], masks["scaled"]) > 0.99  # odd HU values lose 1 HU in the uint16 copy


def test_network_file_and_folder(tiny_model, phantoms, tmp_path):
    p = Predictor.from_path(tiny_model, device="cpu")
    assert p.backend.name == "torch"
    assert p.backend.precision == "fp32"  # precision auto
    assert Predictor.from_path(tiny_model, device="cpu", precision="fp32").backend.precision == "fp32"
    recs = p.predict_path(phantoms["RAS"].parent, tmp_path / "out")
    assert [r["output"].split("/")[-1] for r in recs] == ["LAS.nii.gz", "LPS.nii.gz", "RAS.nii.gz"]
    for r in recs:
        assert_same_grid(r["output"], r["input"])
        assert set(r["timings"]) >= {"load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s", "total_s"}
        assert r["backend"].startswith("torch (")
    # a file into a folder
    rec = p.predict_path(phantoms["LPS"], tmp_path / "single")[0]
    assert rec["output"].endswith("single/LPS.nii.gz")


def test_onnx_backend_end_to_end(tiny_model, phantoms, tmp_path):
    from spleen_utils.export import export_onnx

    onnx_path = tmp_path / "tiny.onnx"
    export_onnx(tiny_model, onnx_path, opset=17, validate=False)  # TorchScript exporter: seconds, not tens
    po = Predictor.from_path(onnx_path, device="cpu")
    pt = Predictor.from_path(tiny_model, device="cpu", precision="fp32")
    assert po.description == "onnx (fp32, cpu)"
    vol = load_nifti(phantoms["LAS"])
    mo, _ = po.predict_volume(vol)
    mt, _ = pt.predict_volume(vol)
    assert mo.shape == vol.shape
    assert int((mo != mt).sum()) <= max(1, int(1e-4 * mo.size))
    # ONNX needs multiples of 16: a sliding window with an odd-sized ROI is refused clearly
    with pytest.raises(SpleenError, match="multiple of 16"):
        Predictor.from_path(onnx_path, device="cpu", window="sliding", roi=(40, 40, 40)).predict_volume(vol)


@pytest.mark.parametrize("case", ["msd_spleen_8_image.nii.gz", "totalseg_ct_3mm.nii.gz"])
def test_real_ct_masks_on_the_input_grid(real_dir, tmp_path, case):
    image = real_dir / case
    rec = Predictor(BoxBackend()).predict_file(image, tmp_path / "m.nii.gz")  # the default path
    assert_same_grid(tmp_path / "m.nii.gz", image)
    assert rec["shape"] == list(nib.load(str(image)).shape) and rec["spleen_voxels"] > 1000
    # the default geometry against MONAI's transforms + Invertd, same windows, on real scanner geometry
    vol = load_nifti(image)
    fast, _ = Predictor(BoxBackend(), lcc=False, window="sliding").predict_volume(vol)
    ref, _ = Predictor(BoxBackend(), lcc=False, window="sliding", preprocess="monai").predict_volume(vol)
    assert fast.sum() > 1000
    assert int((fast != ref).sum()) <= max(1, int(1e-5 * fast.size))


# ----------------------------------------------------------------------------------------------
# errors


def test_errors_are_one_sentence(tmp_path):
    p = Predictor(BoxBackend())
    with pytest.raises(DataError, match="no such file"):
        p.predict_path(tmp_path / "missing.nii.gz", tmp_path / "out")
    flat = write(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.int16), np.eye(4))
    with pytest.raises(DataError, match="2D"):
        p.predict_file(flat, tmp_path / "o.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32)).astype(np.int16)
    good = write(tmp_path / "good.nii.gz", noise, np.eye(4))
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    with pytest.raises(DataError):
        p.predict_file(corrupt, tmp_path / "o.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(DataError):
        p.predict_file(junk, tmp_path / "o.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .nii"):
        p.predict_path(empty, tmp_path / "out")
    assert not (tmp_path / "o.nii.gz").exists()
    with pytest.raises(SpleenError, match="precision"):
        Predictor.from_path(tmp_path / "x.pt", precision="int8")


# ----------------------------------------------------------------------------------------------
# resampling bombs (issue #9): the grid on the recipe's spacing is bounded before it is allocated

from hostile_corpus import ct_block, hostile_corpus, measure  # noqa: E402

from spleen_utils.config import get_config  # noqa: E402
from spleen_utils.preprocess import MAX_RESAMPLED_VOXELS, check_resampled_size  # noqa: E402

QUICK, FULL = get_config("quick").recipe, get_config("full").recipe


@pytest.fixture(scope="module")
def geometry_corpus(tmp_path_factory):
    return [c for c in hostile_corpus(tmp_path_factory.mktemp("bombs")) if c.kind == "geometry"]


@pytest.mark.parametrize("recipe", [QUICK, FULL], ids=["quick", "full"])
@pytest.mark.parametrize("preprocess", ["fast", "monai"])
def test_resampling_bombs_are_refused_before_allocation(geometry_corpus, recipe, preprocess):
    """16^3 voxels of 400 mm (6e9 voxels on the quick grid, 4.8e10 on the full one), 2^3 of 1.6e7 mm,
    64^3 of 90 mm (plausible-ish voxels, an absurd grid) and a zero voxel size: one sentence each,
    with no more memory than the input's few voxels, on both preprocessing paths."""
    predictor = Predictor(BoxBackend(recipe), lcc=False, preprocess=preprocess)
    assert len(geometry_corpus) == 4
    for case in geometry_corpus:
        vol = load_nifti(case.path)
        seconds, peak, err = measure(lambda: predictor.predict_volume(vol))
        print(f"{case.name} ({preprocess}, pixdim {recipe.pixdim}): {seconds * 1000:.1f} ms, peak {peak / 2**20:.2f} MiB")
        assert isinstance(err, DataError), f"{case.name}: {type(err).__name__}: {err}"
        assert "\n" not in str(err) and re.search(case.match, str(err)), str(err)
        assert peak < 16 << 20, f"{case.name}: {peak / 2**20:.1f} MiB allocated to refuse it"


def test_bounds_leave_real_scans_alone():
    """A whole-body CT (512 x 512 x 1000 at 0.98 x 0.98 x 2 mm) fits the full recipe's bound."""
    assert math.prod((334, 334, 1000)) < MAX_RESAMPLED_VOXELS
    assert check_resampled_size((334, 334, 1000), FULL) == (334, 334, 1000)
    with pytest.raises(DataError, match="would become 2000x2000x2000"):
        check_resampled_size((2000, 2000, 2000), FULL)
    with pytest.raises(DataError, match="not a valid size"):
        check_resampled_size((0, 10, 10), FULL)


def test_absurd_spacing_refused_on_the_predict_file_path(tmp_path):
    """The CLI's path (predict_file): NaN-free but absurd voxel sizes are one DataError."""
    for zooms, words in [((400.0, 400.0, 400.0), "voxel size"), ((1e-5, 1.0, 1.0), "voxel size")]:
        p = write(tmp_path / "x.nii.gz", ct_block(), np.diag([*zooms, 1.0]))
        with pytest.raises(DataError, match=words):
            Predictor(BoxBackend(QUICK), lcc=False).predict_file(p, tmp_path / "m.nii.gz")
        assert not (tmp_path / "m.nii.gz").exists()
