"""The C++ ONNX Runtime program (cpp/): build, geometry, agreement with the Python pipeline, bad input.

``cpp/build.sh`` runs once per session (it installs what it needs; exit status 77 means a
prerequisite cannot be obtained on this machine, and these tests skip with its reason).

Two kinds of model drive ``spleen_infer``:

* a *box* model: a 3x3x3 mean filter written as one ONNX ``Conv`` (logits ``0.5 - m`` and ``m - 0.5``),
  with the recipe in its metadata. Its output depends on where every window lies (zero padding at
  the window edges), so a mask identical to the Python pipeline's (same filter as a torch backend)
  checks the whole geometry: HU window, foreground crop, orientation, spacing, sliding window,
  blending, inversion to the input grid. It needs no trained weights.
* the real network: the quick-profile checkpoint (``outputs/runs/quick/best_model.pt``) exported
  with :func:`spleen_utils.export.export_onnx`, compared with ``Predictor`` (onnx backend) at
  Dice >= 0.99; without a trained checkpoint, random weights check only the geometry.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_utils.config import Recipe

pytestmark = pytest.mark.slow  # builds and runs the C++ program (make test-fast skips it)

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"
BINARY = CPP / "build" / "spleen_infer"
TRAINED = ROOT / "outputs" / "runs" / "quick" / "best_model.pt"
REAL_CASES = ["totalseg_ct_3mm.nii.gz", "msd_spleen_8_image.nii.gz"]
TIMING_KEYS = {"load_model", "read", "preprocess", "inference", "postprocess", "write", "total"}


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def spleen_infer() -> Path:
    """cpp/build.sh, once per session."""
    proc = subprocess.run(["bash", str(CPP / "build.sh")], check=False, capture_output=True, text=True, timeout=3600)
    if proc.returncode == 77:
        reason = (proc.stderr.strip().splitlines() or ["cpp/build.sh: prerequisite unavailable"])[-1]
        print(reason)
        pytest.skip(reason)
    assert proc.returncode == 0, f"cpp/build.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert BINARY.exists()
    return BINARY


BOX_W = np.zeros((2, 1, 3, 3, 3), np.float32)
BOX_W[0], BOX_W[1] = -1.0 / 27, 1.0 / 27
BOX_B = np.array([0.5, -0.5], np.float32)


def write_box_model(path: Path, recipe: Recipe, with_recipe: bool = True) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["input", "W", "B"], ["output"], pads=[1] * 6, kernel_shape=[3, 3, 3])
    graph = helper.make_graph(
        [node],
        "box",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, "x", "y", "z"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 2, "x", "y", "z"])],
        initializer=[numpy_helper.from_array(BOX_W, "W"), numpy_helper.from_array(BOX_B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_recipe:
        model.metadata_props.add(key="recipe", value=json.dumps(recipe.to_dict()))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class BoxBackend:
    """The box model as a spleen_utils backend (torch), for the Python reference."""

    name = "box"
    precision = "fp32"
    device = torch.device("cpu")
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.meta: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv3d(x, torch.from_numpy(BOX_W), torch.from_numpy(BOX_B), padding=1)


@pytest.fixture(scope="module")
def box_model(tmp_path_factory) -> Path:
    return write_box_model(tmp_path_factory.mktemp("box") / "box.onnx", Recipe())


def box_predictor(window: str = "auto"):
    from spleen_utils.infer import Predictor

    return Predictor(BoxBackend(Recipe()), lcc=False, window=window)


@pytest.fixture(scope="module")
def network_model(tmp_path_factory) -> tuple[Path, bool]:
    """(ONNX file, trained?): the quick run's checkpoint exported, else random weights."""
    from spleen_utils.export import export_onnx

    d = tmp_path_factory.mktemp("network")
    if TRAINED.exists():
        ckpt, trained = TRAINED, True
    else:
        from spleen_utils.model import build_network, save_checkpoint

        torch.manual_seed(0)
        recipe = Recipe()
        ckpt, trained = save_checkpoint(build_network(recipe), recipe, d / "random.pt"), False
    out = d / "model.onnx"
    export_onnx(ckpt, out, validate=False)  # tests/test_export.py checks the export itself
    return out, trained


# ----------------------------------------------------------------------------------------------
# helpers


def run(binary: Path, model: Path, image: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # the rpath must suffice
    return subprocess.run(
        [str(binary), str(model), str(image), str(out), "--threads", "2", *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def timings(stdout: str) -> dict:
    record = json.loads(stdout.strip().splitlines()[-1])
    assert TIMING_KEYS <= set(record["timings_ms"]), record
    return record


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def check_same_grid(out: Path, image: Path) -> np.ndarray:
    ref, got = nib.load(str(image)), nib.load(str(out))
    assert got.get_data_dtype() == np.uint8
    assert got.shape == ref.shape[:3]
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(got.header.get_zooms()[:3], ref.header.get_zooms()[:3], rtol=1e-6)
    mask = np.asarray(got.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    return mask


def no_leftovers(folder: Path, keep: set[str]) -> None:
    extra = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert not extra, f"files left behind: {extra}"


def smooth_ct(shape, seed: int) -> np.ndarray:
    """Smooth random 'anatomy' in HU around the recipe's window (-57..164)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
    return x / x.std() * 150.0 + 20.0


def synthetic_case(kind: str, folder: Path) -> Path:
    if kind == "oblique_float64_sform":
        t = 0.3
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        aff = np.eye(4)
        aff[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5])
        aff[:3, 3] = [-50, 20, 10]
        img = nib.Nifti1Image(smooth_ct((60, 50, 24), 1), aff)
        path = folder / "oblique.nii.gz"
    elif kind == "permuted_qform_int16_scaled_bigendian":
        aff = np.array([[0, 0, -1.2, 30], [-0.8, 0, 0, 5], [0, 2.0, 0, -7], [0, 0, 0, 1.0]])
        data = np.round(smooth_ct((48, 30, 70), 2) / 2 - 1.5).astype(">i2")
        img = nib.Nifti1Image(data, None, header=nib.Nifti1Header(endianness=">"))
        img.set_qform(aff, code=1)
        img.set_sform(None, code=0)
        img.header.set_slope_inter(2.0, 3.0)
        path = folder / "permuted.nii"
    elif kind == "small_uint8_at_target_spacing":
        data = np.random.default_rng(3).integers(0, 255, (30, 20, 10)).astype(np.uint8)
        img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
        img.header.set_slope_inter(1.0, -100.0)
        path = folder / "small.nii.gz"
    elif kind == "sheared_no_codes_4d_singleton":
        aff = np.array([[1.0, 0.2, 0, 0], [0, 1.0, 0.1, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
        img = nib.Nifti1Image(smooth_ct((40, 44, 12), 4)[..., None].astype(np.float32), aff)
        img.set_qform(aff, code=0)
        img.set_sform(aff, code=0)
        path = folder / "sheared.nii.gz"
    else:
        raise AssertionError(kind)
    nib.save(img, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# tests


def test_help_runs_without_library_path(spleen_infer):
    env = {"PATH": "/usr/bin:/bin"}  # no LD_LIBRARY_PATH: the rpath must find libonnxruntime
    proc = subprocess.run([str(spleen_infer), "--help"], check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "usage: spleen_infer MODEL.onnx INPUT" in proc.stdout


@pytest.mark.parametrize(
    "kind",
    [
        "oblique_float64_sform",
        "permuted_qform_int16_scaled_bigendian",
        "small_uint8_at_target_spacing",
        "sheared_no_codes_4d_singleton",
    ],
)
def test_box_model_matches_python_pipeline_synthetic(spleen_infer, box_model, tmp_path, kind):
    image = synthetic_case(kind, tmp_path)
    proc = run(spleen_infer, box_model, image, tmp_path / "cpp.nii.gz")
    assert proc.returncode == 0, proc.stderr
    timings(proc.stdout)
    got = check_same_grid(tmp_path / "cpp.nii.gz", image)
    box_predictor().predict_file(image, tmp_path / "py.nii.gz")
    want = np.asarray(nib.load(str(tmp_path / "py.nii.gz")).dataobj)
    assert want.sum() > 0 and (want == 0).sum() > 0  # a mask with something in it, not everything
    assert (got != want).sum() <= max(1, int(1e-4 * got.size)), f"{(got != want).sum()} voxels differ"


@pytest.mark.parametrize("window", ["auto", "sliding"])
@pytest.mark.parametrize("case", REAL_CASES)
def test_box_model_matches_python_pipeline_real(spleen_infer, box_model, real_dir, tmp_path, case, window):
    """auto: Python's rule (one window padded to the ROI within it, else sliding); sliding: the
    recipe's 160^3 windows, overlap 0.25. The masks must agree either way."""
    image = real_dir / case
    proc = run(spleen_infer, box_model, image, tmp_path / "cpp.nii.gz", "--window", window)
    assert proc.returncode == 0, proc.stderr
    used = timings(proc.stdout)["window"]
    assert used == "sliding" if window == "sliding" else used in ("whole", "sliding")
    got = check_same_grid(tmp_path / "cpp.nii.gz", image)
    box_predictor(window).predict_file(image, tmp_path / "py.nii.gz")
    want = np.asarray(nib.load(str(tmp_path / "py.nii.gz")).dataobj)
    assert want.sum() > 1000
    assert dice(got, want) >= 0.999, f"Dice {dice(got, want):.5f}, {(got != want).sum()} voxels differ"


@pytest.mark.parametrize("case", REAL_CASES)
def test_network_on_real_ct(spleen_infer, network_model, real_dir, tmp_path, case):
    model, trained = network_model
    image = real_dir / case
    out = tmp_path / "mask.nii.gz"
    proc = run(spleen_infer, model, image, out)
    assert proc.returncode == 0, proc.stderr
    record = timings(proc.stdout)
    print(f"{case}: spleen_infer timings (ms, 2 threads): {record['timings_ms']}, {record['windows']} windows")
    got = check_same_grid(out, image)
    no_leftovers(tmp_path, {"mask.nii.gz"})
    if not trained:
        pytest.skip(f"no trained model at {TRAINED.relative_to(ROOT)}: geometry checked with random weights, Dice vs Python not")
    from spleen_utils.infer import Predictor

    Predictor.from_path(model, backend="onnx", device="cpu", lcc=False).predict_file(image, tmp_path / "py.nii.gz")
    want = np.asarray(nib.load(str(tmp_path / "py.nii.gz")).dataobj)
    d = dice(got, want)
    print(f"{case}: Dice C++ vs Python = {d:.5f} ({int(got.sum())} vs {int(want.sum())} voxels)")
    assert d >= 0.99


def test_empty_foreground_gives_empty_mask(spleen_infer, box_model, tmp_path):
    image = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 18, 16), -1000, np.int16), np.diag([2.0, 2.0, 3.0, 1.0])), str(image))
    proc = run(spleen_infer, box_model, image, tmp_path / "mask.nii.gz")
    assert proc.returncode == 0, proc.stderr
    assert check_same_grid(tmp_path / "mask.nii.gz", image).sum() == 0


def _bad_input(kind: str, folder: Path) -> Path:
    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.round(smooth_ct((64, 64, 48), 5)).astype(np.int16), np.eye(4)), str(good))
    raw = good.read_bytes()
    path = folder / f"{kind}.nii.gz"
    if kind == "text_renamed":
        path.write_text("patient_id,volume_ml\n8,261.0\n")
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "truncated_header":
        path.write_bytes(raw[:100])
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "2d":
        nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(path))
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 3), np.int16), np.eye(4)), str(path))
    elif kind == "complex":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.complex64), np.eye(4)), str(path))
    elif kind == "nan":
        data = np.zeros((16, 16, 16), np.float32)
        data[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    elif kind == "missing":
        pass
    else:
        raise AssertionError(kind)
    good.unlink()
    return path


@pytest.mark.parametrize(
    "kind", ["text_renamed", "truncated", "truncated_header", "empty_file", "2d", "4d", "complex", "nan", "missing"]
)
def test_malformed_input_is_refused_cleanly(spleen_infer, box_model, tmp_path, kind):
    image = _bad_input(kind, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run(spleen_infer, box_model, image, out_dir / "mask.nii.gz")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # an exit status, never a signal
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spleen_infer: error: "), proc.stderr
    assert image.name in lines[0]
    no_leftovers(out_dir, set())


def test_model_without_recipe_is_refused(spleen_infer, tmp_path):
    model = write_box_model(tmp_path / "norecipe.onnx", Recipe(), with_recipe=False)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(image))
    proc = run(spleen_infer, model, image, tmp_path / "mask.nii.gz")
    assert proc.returncode == 2 and "recipe" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    proc = run(spleen_infer, junk, image, tmp_path / "mask.nii.gz")
    assert proc.returncode == 2 and "junk.onnx" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mask.nii.gz").exists()


def test_recipe_drives_the_pipeline(spleen_infer, tmp_path):
    """Another spacing and window in the metadata change the resampled grid and the mask."""
    image = synthetic_case("oblique_float64_sform", tmp_path)
    masks = {}
    for name, recipe in {"default": Recipe(), "coarse": Recipe(pixdim=(3.0, 3.0, 4.0), hu_window=(0.0, 100.0))}.items():
        model = write_box_model(tmp_path / f"{name}.onnx", recipe)
        proc = run(spleen_infer, model, image, tmp_path / f"{name}.nii.gz")
        assert proc.returncode == 0, proc.stderr
        assert "pixdim {:g}x{:g}x{:g} mm".format(*recipe.pixdim) in proc.stdout
        masks[name] = check_same_grid(tmp_path / f"{name}.nii.gz", image)
    assert (masks["default"] != masks["coarse"]).any()


def test_unwritable_output_is_refused(spleen_infer, box_model, tmp_path):
    image = synthetic_case("small_uint8_at_target_spacing", tmp_path)
    proc = run(spleen_infer, box_model, image, tmp_path / "no_such_dir" / "mask.nii.gz")
    assert proc.returncode == 2 and "no_such_dir" in proc.stderr
    proc = run(spleen_infer, box_model, image, tmp_path / "mask.txt")
    assert proc.returncode == 2 and ".nii" in proc.stderr


def test_window_modes(spleen_infer, box_model, tmp_path):
    image = synthetic_case("small_uint8_at_target_spacing", tmp_path)  # 30x20x10 at the recipe spacing
    masks, records = {}, {}
    for mode, expect in [("sliding", "1 of 160x160x160"), ("whole", "1 of 160x160x160"), ("auto", "1 of 160x160x160")]:
        proc = run(spleen_infer, box_model, image, tmp_path / f"{mode}.nii.gz", "--window", mode)
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stdout, proc.stdout  # whole: padded to at least the ROI, as in Python
        records[mode] = timings(proc.stdout)
        masks[mode] = check_same_grid(tmp_path / f"{mode}.nii.gz", image)
    assert records["auto"]["window"] == "whole"
    # one window with zero padding either way: the box filter gives the same mask
    np.testing.assert_array_equal(masks["sliding"], masks["whole"])
    proc = run(spleen_infer, box_model, image, tmp_path / "small.nii.gz", "--max-window-voxels", "1000")
    assert proc.returncode == 0 and timings(proc.stdout)["window"] == "sliding"
    proc = run(spleen_infer, box_model, image, tmp_path / "bad.nii.gz", "--window", "tiles")
    assert proc.returncode == 2 and "--window" in proc.stderr


# ----------------------------------------------------------------------------------------------
# hostile input under AddressSanitizer and UBSan (issue #9)

from hostile_corpus import hostile_corpus  # noqa: E402

SANITIZED = CPP / "build" / "sanitize" / "spleen_infer"
SANITIZER_WORDS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer", "runtime error:", "SUMMARY:")


@pytest.fixture(scope="module")
def spleen_infer_sanitized() -> Path:
    """cpp/build.sh with SANITIZE=1: the same program built with -fsanitize=address,undefined."""
    env = {**os.environ, "SANITIZE": "1"}
    proc = subprocess.run(["bash", str(CPP / "build.sh")], check=False, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode == 77:
        pytest.skip((proc.stderr.strip().splitlines() or ["cpp/build.sh: sanitizers unavailable"])[-1])
    assert proc.returncode == 0, f"SANITIZE=1 cpp/build.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert SANITIZED.exists()
    return SANITIZED


def run_measured(cmd: list[str], env: dict) -> tuple[int, str, str, float, float]:
    """(exit status, stdout, stderr, seconds, peak RSS in MiB or NaN) of one run of ``cmd``; the RSS
    comes from GNU time when installed (a child's own rusage would count the forked Python too)."""
    import shutil
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as d:
        rss_file = Path(d) / "rss"
        timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if shutil.which("time") == "/usr/bin/time" else []
        t0 = time.perf_counter()
        proc = subprocess.run(timer + cmd, check=False, capture_output=True, text=True, timeout=900, env=env)
        seconds = time.perf_counter() - t0
        rss = float("nan")
        if timer and rss_file.exists() and rss_file.read_text().split():
            rss = int(rss_file.read_text().split()[-1]) / 1024
        return proc.returncode, proc.stdout, proc.stderr, seconds, rss


@pytest.mark.parametrize("pixdim", [(3.0, 3.0, 4.0), (1.5, 1.5, 2.0)], ids=["quick", "full"])
def test_hostile_corpus_under_sanitizers(spleen_infer_sanitized, tmp_path, pixdim):
    """Every hostile file (bad extension sizes, bad datatype, negative/NaN voxel offsets, truncated
    files, 16^3 voxels of 400 mm, 2^3 voxels of 1.6e7 mm, ...): exit 2, one error line, no sanitizer
    report, no file left behind."""
    model = write_box_model(tmp_path / "box.onnx", Recipe(pixdim=pixdim))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    # leaks: ONNX Runtime keeps process-lifetime allocations; memory errors and UB abort at once
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=99"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=98"
    cases = hostile_corpus(tmp_path / "corpus")
    assert len(cases) >= 20
    report = []
    for case in cases:
        rc, out, err, seconds, rss = run_measured(
            [str(spleen_infer_sanitized), str(model), str(case.path), str(out_dir / "mask.nii.gz"), "--threads", "1"], env)
        report.append(f"{case.name}: exit {rc}, {seconds:.2f} s, peak RSS {rss:.0f} MiB (ASan build)")
        assert not any(w in err for w in SANITIZER_WORDS), f"{case.name}: sanitizer report:\n{err[-3000:]}"
        assert rc == 2, f"{case.name}: exit {rc}\n{err[-2000:]}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spleen_infer: error: "), f"{case.name}: {err!r}"
        assert case.path.name in lines[0] and re.search(case.match, lines[0]), f"{case.name}: {lines[0]}"
        no_leftovers(out_dir, set())
    print("\n".join(report))


def test_sanitized_build_still_segments(spleen_infer_sanitized, box_model, tmp_path):
    """The sanitized program on a well-formed image: a mask, and no report (the corpus test is not
    passing merely because everything is refused)."""
    image = synthetic_case("oblique_float64_sform", tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    env["UBSAN_OPTIONS"] = "halt_on_error=1"
    rc, out, err, _, _ = run_measured([str(spleen_infer_sanitized), str(box_model), str(image), str(tmp_path / "m.nii.gz"),
                                       "--threads", "2"], env)
    assert rc == 0 and not any(w in err for w in SANITIZER_WORDS), err[-3000:]
    assert check_same_grid(tmp_path / "m.nii.gz", image).sum() > 0


def test_mask_is_written_through_a_private_folder_and_fsynced(spleen_infer, box_model, tmp_path):
    """The mask's temporary file: inside a fresh mkdtemp folder (mode 0700, random name), opened
    without following symlinks for fsync, fsync'ed before the rename (strace shows the calls)."""
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: the system calls of the mask write cannot be observed")
    image = synthetic_case("small_uint8_at_target_spacing", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    trace = tmp_path / "trace.txt"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=mkdir,mkdirat,openat,open,fsync,rename,renameat,renameat2",
                           str(spleen_infer), str(box_model), str(image), str(out / "mask.nii.gz"), "--threads", "1"],
                          check=False, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    calls = trace.read_text().splitlines()
    mk = [c for c in calls if re.search(r"mkdir(at)?\(.*/out/\.mask\.nii\.gz\.\w{6}\", 0700\) = 0", c)]
    assert len(mk) == 1, "\n".join(c for c in calls if "out/" in c)
    folder = re.search(r"\"([^\"]+/out/\.mask\.nii\.gz\.\w{6})\"", mk[0]).group(1)
    i_mk = calls.index(mk[0])
    i_rename = next(i for i, c in enumerate(calls) if re.search(r"rename(at2?)?\(.*" + re.escape(folder) + r"/mask\.nii\.gz.*out/mask\.nii\.gz", c))
    opened = [i for i, c in enumerate(calls) if "open" in c and f"{folder}/mask.nii.gz" in c]
    assert opened and all(i_mk < i < i_rename for i in opened)
    nofollow = [i for i in opened if "O_NOFOLLOW" in calls[i]]
    assert nofollow, [calls[i] for i in opened]
    fd = re.search(r"= (\d+)$", calls[nofollow[-1]]).group(1)
    assert any(re.search(rf"fsync\({fd}\)\s+= 0", c) for c in calls[nofollow[-1]:i_rename]), calls[nofollow[-1]:i_rename + 1]
    no_leftovers(out, {"mask.nii.gz"})
    assert check_same_grid(out / "mask.nii.gz", image).shape == (30, 20, 10)


@pytest.mark.parametrize("field,value", [
    ("hu_window", (164.0, -57.0)), ("overlap", 1.0), ("sw_roi", (8, 8, 8)), ("pixdim", (0.0, 1.5, 2.0)),
    ("pixdim", (100.0, 100.0, 100.0)), ("sw_batch_size", 0), ("sw_roi", (2048, 160, 160)),
])
def test_bad_recipe_refused_alike_by_cpp_and_python(spleen_infer, tmp_path, field, value):
    """The recipe in a model file: cpp/src/recipe.cpp and spleen_utils.config.Recipe.validate refuse the same ones."""
    import dataclasses

    from spleen_utils.errors import SpleenError

    bad = dataclasses.replace(Recipe(), **{field: value})
    model = write_box_model(tmp_path / "bad.onnx", bad)
    image = synthetic_case("small_uint8_at_target_spacing", tmp_path)
    proc = run(spleen_infer, model, image, tmp_path / "mask.nii.gz")
    assert proc.returncode == 2 and f"'{field}'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(SpleenError, match=f"field '{field}'"):
        Recipe.from_model(bad.to_dict(), "bad.onnx")
