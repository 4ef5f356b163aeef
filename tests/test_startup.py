"""Fast start-up and the torch-free ONNX path (issue 14).

* ``spleen-seg --help`` and ``spleen-seg predict`` with an ONNX model import neither torch nor
  MONAI (checked in a fresh interpreter, through ``sys.modules``);
* the numpy pieces that let them (MONAI's grid arithmetic, its sliding window, its largest
  connected component, the ONNX contract) compute what MONAI / the exporter compute;
* folder prediction overlaps reading and writing with the network and still reports every
  case, in order, with its own stage times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_utils import backends, infer, postprocess, preprocess
from spleen_utils.config import Recipe
from spleen_utils.infer import Predictor, scan_slices, sliding_window
from spleen_utils.preprocess import compute_shape_offset, zoom_affine
from spleen_utils.synthetic import make_phantom

TINY = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2, pixdim=(4.0, 4.0, 5.0))


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def predict_in_fresh_python(*args, prelude: str = "") -> subprocess.CompletedProcess:
    """``spleen-seg predict ARGS`` in a fresh interpreter (after ``prelude``); its last line is
    ``rc <code> <torch imported> <monai imported> <onnxruntime imported>``."""
    return fresh_python(
        f"import sys\n{prelude}from spleen_utils.cli import main\n"
        f"rc = main(['predict', *{[str(a) for a in args]!r}])\n"
        "print('rc', rc, *(m in sys.modules for m in ('torch', 'monai', 'onnxruntime')))"
    )


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from spleen_utils.export import export_onnx
    from spleen_utils.model import build_network, save_checkpoint

    d = tmp_path_factory.mktemp("startup")
    torch.manual_seed(0)
    pt = save_checkpoint(build_network(TINY), TINY, d / "tiny.pt")
    return Path(export_onnx(pt, d / "tiny.onnx", opset=17, validate=False)["path"]), pt


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cts")
    for i, codes in enumerate(("RAS", "LPS", "LAS")):
        img, lab, aff = make_phantom(i, codes, (4.0, 4.0, 5.0))
        nib.save(nib.Nifti1Image(img, aff), str(d / f"case_{i}.nii.gz"))
        if i == 0:
            nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), str(d / "case_0_label.nii.gz"))  # skipped by name
            nib.save(nib.Nifti1Image(lab.astype(np.uint8), aff), str(d / "zz_labelmap.nii.gz"))  # skipped by content
    return d


# ----------------------------------------------------------------------------------------------
# what a fresh process imports


def test_help_imports_neither_torch_nor_monai():
    r = fresh_python(
        "import sys\nfrom spleen_utils.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('torch', 'monai', 'onnxruntime', 'scipy') if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert "predict" in r.stdout and r.stdout.strip().splitlines()[-1] == "[]"


def test_onnx_predict_imports_neither_torch_nor_monai(onnx_model, ct_folder, tmp_path):
    onnx_path, _ = onnx_model
    out = tmp_path / "masks"
    r = predict_in_fresh_python("--model", onnx_path, "--input", ct_folder, "--output", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "rc 0 False False True"
    assert sorted(p.name for p in out.iterdir()) == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]
    assert "3 cases in" in r.stdout  # the folder's total time


def test_torch_predict_still_works_and_imports_torch_only_then(onnx_model, ct_folder, tmp_path):
    _, pt = onnx_model
    r = predict_in_fresh_python("--model", pt, "--backend", "torch", "--input", ct_folder / "case_1.nii.gz", "--output", tmp_path / "m.nii.gz",
                                prelude="import spleen_utils.infer, spleen_utils.backends\nprint('before', 'torch' in sys.modules)\n")
    assert r.returncode == 0, r.stderr
    assert "before False" in r.stdout.splitlines()  # importing the library does not import torch
    assert r.stdout.strip().splitlines()[-1].startswith("rc 0 True")
    assert "torch (fp32, cpu)" in r.stdout


def test_a_checkpoint_with_its_own_export_beside_it_predicts_without_torch(onnx_model, ct_folder, tmp_path):
    """The default for a checkpoint is its ONNX export when that file names the checkpoint's digest."""
    onnx_path, pt = onnx_model
    assert onnx_path.parent == pt.parent and onnx_path.stem == pt.stem  # tiny.onnx beside tiny.pt
    r = predict_in_fresh_python("--model", pt, "--input", ct_folder / "case_1.nii.gz", "--output", tmp_path / "m.nii.gz")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "rc 0 False False True"
    assert "onnx (fp32, cpu; tiny.onnx, the export of tiny.pt)" in r.stdout
    # the same mask as the checkpoint through torch
    ref = Predictor.from_path(pt, backend="torch", device="cpu").predict_file(ct_folder / "case_1.nii.gz", tmp_path / "t.nii.gz")
    got, want = (np.asarray(nib.load(str(f)).dataobj) for f in (tmp_path / "m.nii.gz", ref["output"]))
    assert got.any() and int((got != want).sum()) <= max(1, int(1e-4 * got.size))


def test_an_export_of_another_checkpoint_is_not_used(onnx_model, tmp_path):
    from spleen_utils.model import build_network, save_checkpoint

    onnx_path, pt = onnx_model
    torch.manual_seed(1)  # other weights: the export beside it names another digest
    other = save_checkpoint(build_network(TINY), TINY, tmp_path / "best_model.pt")
    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    assert backends.onnx_twin(other, "cpu") is None
    assert Predictor.from_path(other, device="cpu").backend.name == "torch"
    # the right checkpoint finds it under the name spleen-seg export writes
    (tmp_path / "best_model.pt").write_bytes(pt.read_bytes())
    twin = backends.onnx_twin(tmp_path / "best_model.pt", "cpu")
    assert twin is not None and twin.path == tmp_path / "model.onnx" and twin.exported_from == tmp_path / "best_model.pt"
    # other precisions, other devices and an explicit backend keep torch
    assert backends.onnx_twin(pt, "cpu", "bf16") is None and backends.onnx_twin(pt, "cuda") is None
    assert Predictor.from_path(pt, backend="torch", device="cpu").backend.name == "torch"
    assert Predictor.from_path(pt, device="cpu").backend.name == "onnx"


# ----------------------------------------------------------------------------------------------
# the numpy pieces compute what MONAI computes


def _random_affine(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a = np.eye(4)
    a[:3, :3] = q @ np.diag(rng.uniform(0.4, 5.0, 3))
    a[:3, 3] = rng.uniform(-300, 300, 3)
    return a


def test_grid_arithmetic_equals_monai():
    from monai.data.utils import compute_shape_offset as monai_shape_offset
    from monai.data.utils import zoom_affine as monai_zoom

    rng = np.random.default_rng(0)
    affines = [np.diag([0.7, 0.7, 2.5, 1.0]), np.diag([-0.8, -0.8, 1.5, 1.0])] + [_random_affine(rng) for _ in range(20)]
    for a in affines:
        pixdim = rng.uniform(0.5, 4.0, 3)
        shape = tuple(int(v) for v in rng.integers(5, 300, 3))
        want = monai_zoom(a, pixdim, diagonal=False)
        np.testing.assert_allclose(zoom_affine(a, pixdim), want, atol=1e-12)
        s_want, o_want = monai_shape_offset(shape, a, want, False)
        s_got, o_got = compute_shape_offset(shape, a, want)
        assert tuple(s_got) == tuple(s_want)
        np.testing.assert_allclose(o_got, o_want, atol=1e-9)


@pytest.mark.parametrize("shape,roi,overlap", [((70, 50, 33), (32, 32, 32), 0.25), ((20, 64, 9), (32, 32, 16), 0.5),
                                               ((64, 64, 64), (64, 64, 64), 0.25), ((97, 41, 60), (48, 48, 48), 0.0)])
def test_numpy_sliding_window_equals_monai(shape, roi, overlap):
    from monai.inferers import sliding_window_inference

    w = torch.randn(3, 1, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    calls = []

    def net(x):  # position-sensitive (zero padding at each window's border): windows must match exactly
        calls.append(tuple(x.shape))
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        y = torch.nn.functional.conv3d(t, w, padding=1)
        return y.numpy() if isinstance(x, np.ndarray) else y

    image = np.random.default_rng(2).random((1, 1, *shape), dtype=np.float32)
    want = sliding_window_inference(torch.from_numpy(image), roi, 3, net, overlap=overlap, mode="constant").numpy()
    n_monai = len(calls)
    got = sliding_window(image, roi, 3, net, overlap)
    assert got.shape == want.shape == (1, 3, *shape)
    assert len(calls) == 2 * n_monai  # the same number of batches
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert len(scan_slices(tuple(max(n, r) for n, r in zip(shape, roi)), roi, overlap)) == sum(c[0] for c in calls[:n_monai])


def test_largest_component_equals_monai():
    from monai.transforms import KeepLargestConnectedComponent

    rng = np.random.default_rng(3)
    for i in range(12):
        mask = (rng.random((30, 25, 20)) > (0.75 if i % 2 else 0.9)).astype(np.uint8)
        if i == 0:
            mask[:] = 0
            mask[2:5, 2:5, 2:5] = mask[10:13, 10:13, 10:13] = 1  # a tie: MONAI's choice
        want = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)(torch.from_numpy(mask.copy())[None])[0].numpy()
        got = postprocess.keep_one_component(mask)
        assert got.dtype == np.uint8 and np.array_equal(got, want.astype(np.uint8)), i
        assert got.sum() <= mask.sum() and (i != 0 or got.sum() == 27)


def test_of_comparable_components_the_surest_is_kept():
    """A larger but less sure rival (the gluteal muscles a real scan showed) loses to the spleen; a
    small sure island does not beat a large component; without a margin it is MONAI's rule."""
    mask = np.zeros((40, 30, 30), np.uint8)
    margin = np.full(mask.shape, -5.0, np.float32)
    mask[2:12, 2:12, 2:12] = 1  # the spleen: 1,000 voxels, sure of itself
    margin[2:12, 2:12, 2:12] = 6.0
    mask[20:32, 5:17, 5:15] = 1  # a rival: 1,440 voxels, barely above the line
    margin[20:32, 5:17, 5:15] = 0.8
    kept = postprocess.keep_one_component(mask, margin)
    assert kept.dtype == np.uint8 and kept.sum() == 1000 and kept[5, 5, 5] == 1 and kept[25, 10, 10] == 0
    assert np.array_equal(postprocess.keep_one_component(mask), postprocess.keep_one_component(mask))  # no margin: the largest
    assert postprocess.keep_one_component(mask)[25, 10, 10] == 1
    # an island under RIVAL_FRACTION of the largest is no rival, however sure
    small = mask.copy()
    small[2:12, 2:12, 2:12] = 0
    small[36:39, 25:28, 25:28] = 1  # 27 voxels
    margin2 = margin.copy()
    margin2[36:39, 25:28, 25:28] = 20.0
    assert 27 < postprocess.RIVAL_FRACTION * 1440
    assert np.array_equal(postprocess.keep_one_component(small, margin2), postprocess.keep_one_component(small))
    # one component, or none: unchanged
    single = np.zeros_like(mask)
    single[2:12, 2:12, 2:12] = 1
    assert np.array_equal(postprocess.keep_one_component(single, margin), single)
    assert not postprocess.keep_one_component(np.zeros_like(mask), margin).any()


@pytest.mark.parametrize("preprocess", ["fast", "monai"])
def test_the_predictor_keeps_the_surest_component(preprocess):
    """Through predict_volume: the margin, brought back to the input's grid, chooses."""
    from spleen_utils.config import Recipe
    from spleen_utils.io import Volume

    class TwoBlobs:  # a big weak blob and a smaller sure one, wherever the image is bright
        name, device, precision, meta, array_api = "blobs", "cpu", "fp32", {}, "numpy"
        recipe = Recipe(pixdim=(2.0, 2.0, 2.0), sw_roi=(32, 32, 32), channels=(4, 8), strides=(2,))

        def __call__(self, x):
            x = np.asarray(x)
            out = np.zeros((x.shape[0], 2, *x.shape[2:]), np.float32)
            out[:, 1] = -4.0
            out[:, 1, 1:11, 1:11, 1:11] = 5.0  # 1,000 voxels
            out[:, 1, 13:27, 13:27, 13:27] = 0.5  # 2,744 voxels
            return out

    image = np.zeros((32, 32, 32), np.float32)
    image[1:30, 1:30, 1:30] = 100.0  # the body: what the crop keeps
    vol = Volume(image, np.diag([2.0, 2.0, 2.0, 1.0]), None)
    surest, _ = infer.Predictor(TwoBlobs(), preprocess=preprocess, optimize=False).predict_volume(vol)
    raw, _ = infer.Predictor(TwoBlobs(), lcc=False, preprocess=preprocess, optimize=False).predict_volume(vol)
    assert raw[6, 6, 6] == 1 and raw[21, 21, 21] == 1  # two components, the weak one larger
    assert surest[6, 6, 6] == 1 and surest[21, 21, 21] == 0 and surest.sum() < raw.sum() / 2


def test_onnx_contract_is_the_exporters(onnx_model):
    from spleen_utils import artifact, export

    # one definition: the exporter writes and the torch-free reader reads the artifact module's contract
    assert (export.INPUT_NAME, export.OUTPUT_NAME) == (artifact.INPUT_NAME, artifact.OUTPUT_NAME)
    assert (backends.INPUT_NAME, backends.OUTPUT_NAME) == (artifact.INPUT_NAME, artifact.OUTPUT_NAME)
    assert backends.parse_onnx_metadata is artifact.parse_onnx_metadata and export.read_onnx_metadata is artifact.read_onnx_metadata
    assert export.spatial_multiple is artifact.spatial_multiple is backends.spatial_multiple
    import onnxruntime as ort

    # what the exporter wrote satisfies the reader
    props = ort.InferenceSession(str(onnx_model[0]), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    meta = artifact.parse_onnx_metadata(props, "m")
    assert meta["format"] == artifact.ONNX_FORMAT and set(artifact.ONNX_REQUIRED_KEYS) - {"spleen_utils.format"} <= set(meta)
    with pytest.raises(backends.SpleenError, match="without spleen_utils metadata"):
        backends.parse_onnx_metadata({}, "m")


def test_onnx_backend_takes_numpy_and_torch(onnx_model):
    b = backends.OnnxBackend(onnx_model[0], device="cpu")
    x = np.random.default_rng(0).random((1, 1, 32, 32, 16), dtype=np.float32)
    y = b(x)
    assert isinstance(y, np.ndarray) and y.shape == (1, 2, 32, 32, 16)
    yt = b(torch.from_numpy(x))
    assert isinstance(yt, torch.Tensor) and np.array_equal(yt.numpy(), y)
    assert b.device == torch.device("cpu") and str(b.device) == "cpu" and b.device.type == "cpu"


def test_onnx_and_torch_predictors_agree_on_sliding_windows(onnx_model, ct_folder):
    from spleen_utils.io import load_nifti

    onnx_path, pt = onnx_model
    vol = load_nifti(ct_folder / "case_1.nii.gz")
    po = Predictor.from_path(onnx_path, device="cpu", window="sliding", lcc=False)
    pt_ = Predictor.from_path(pt, backend="torch", device="cpu", window="sliding", lcc=False)
    prep = preprocess.prepare(vol, po.recipe)
    assert any(n > r for n, r in zip(prep.image.shape, po.roi))  # several windows: the numpy sliding window runs
    lo, lt = po.logits(prep.image[None]), pt_.logits(prep.image[None])
    assert isinstance(lo, np.ndarray) and lo.shape == lt.shape == (2, *prep.image.shape)
    np.testing.assert_allclose(lo, lt, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------
# precision and the folder pipeline


def test_auto_precision_is_fp32_and_every_precision_is_offered(onnx_model):
    _, pt = onnx_model
    assert infer.DEFAULT_PRECISION == "fp32"
    assert Predictor.from_path(pt, device="cpu").backend.precision == "fp32"
    with pytest.raises(infer.SpleenError) as e:
        Predictor.from_path(pt, precision="int8")
    assert all(p in str(e.value) for p in infer.PRECISIONS)
    from spleen_utils.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd in ("predict", "bench"):
        opt = next(a for a in sub.choices[cmd]._actions if a.dest == "precision")
        assert tuple(opt.choices) == infer.PRECISIONS and opt.default == "auto"


def test_folder_prediction_reports_each_case_in_order(onnx_model, ct_folder, tmp_path):
    onnx_path, _ = onnx_model
    p = Predictor.from_path(onnx_path, device="cpu")
    seen, skipped = [], []
    records = p.predict_path(ct_folder, tmp_path / "out", on_case=lambda r: seen.append(r["input"]), on_skip=lambda f, why: skipped.append(f.name))
    names = [f"case_{i}.nii.gz" for i in range(3)]
    assert [r["input"].rsplit("/", 1)[-1] for r in records] == names and seen == [r["input"] for r in records]
    assert sorted(skipped) == ["case_0_label.nii.gz", "zz_labelmap.nii.gz"]
    for r in records:
        t = r["timings"]
        assert {"load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s", "total_s"} <= set(t)
        assert t["total_s"] >= t["inference_s"] > 0 and t["load_s"] > 0 and t["write_s"] > 0
        # the same mask as one file at a time
        one = tmp_path / "one" / r["input"].rsplit("/", 1)[-1]
        p.predict_file(r["input"], one)
        assert np.array_equal(np.asarray(nib.load(r["output"]).dataobj), np.asarray(nib.load(str(one)).dataobj))
    json.dumps(records)  # the CLI's --json
