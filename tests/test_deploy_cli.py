"""The deployment commands of spleen-seg: export-onnx, build-trt, compare-backends, bench."""

from __future__ import annotations

import json

import nibabel as nib
import onnx
import pytest
import torch

from spleen_utils.cli import main
from spleen_utils.config import Recipe
from spleen_utils.export import TOLERANCE, tensorrt_available
from spleen_utils.model import build_network, save_checkpoint
from spleen_utils.synthetic import make_phantom

TINY = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = save_checkpoint(build_network(TINY), TINY, d / "tiny.pt")
    img, lab, aff = make_phantom(7, "LPS", (5.0, 5.0, 6.0))
    image = d / "ct.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(image))
    return d, model, image


@pytest.fixture(scope="module")
def exported(work):
    """``spleen-seg export-onnx`` end to end (TorchScript exporter at opset 17: seconds)."""
    d, model, image = work
    out, report = d / "tiny.onnx", d / "export.json"
    rc = main(["export-onnx", "--model", str(model), "--out", str(out), "--opset", "17", "--real-image", str(image), "--json", str(report)])
    return rc, out, report


def run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("export-onnx", "build-trt", "compare-backends", "bench"):
        assert cmd in out
    for cmd, opts in {
        "export-onnx": ("--model", "--out", "--opset", "--real-image"),
        "build-trt": ("--onnx", "--out", "--fp16"),
        "compare-backends": ("--model", "--onnx", "--data", "--real", "--json"),
        "bench": ("--model", "--onnx", "--json", "--repeats"),
    }.items():
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(o in text for o in opts), (cmd, text)


def test_export_onnx_end_to_end(exported, capsys):
    rc, out, report = exported
    assert rc == 0 and out.exists()
    rep = json.loads(report.read_text())
    assert rep["opset"] == 17 and rep["exporter"] == "torchscript" and rep["validated"]
    assert set(rep["max_abs_diff"]) == {"random_1x1x32x32x32", "random_2x1x64x80x96", "real_ct_1x1x32x32x32"}
    assert all(d < TOLERANCE for d in rep["max_abs_diff"].values())
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props["recipe"])["channels"] == [4, 8, 16, 32, 64]


def test_export_onnx_prints_the_validation(work, capsys, tmp_path):
    _, model, _ = work
    rc, out, _ = run(capsys, ["export-onnx", "--model", str(model), "--out", str(tmp_path / "m.onnx"), "--opset", "17"])
    assert rc == 0
    assert "validation, max |ONNX Runtime - PyTorch|" in out and "random_1x1x32x32x32" in out and "opset 17" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export-onnx", "--model", "{d}/missing.pt", "--out", "{d}/x.onnx"], "no such model file"),
        (["export-onnx", "--model", "{model}", "--out", "{d}/x.onnx", "--opset", "17", "--exporter", "dynamo"], "opset 18 or newer"),
        (["export-onnx", "--model", "{model}", "--out", "{d}/x.onnx", "--real-image", "{d}/none.nii.gz"], "no such image"),
        (["build-trt", "--onnx", "{d}/missing.onnx", "--out", "{d}/m.engine"], "no such ONNX file"),
        (["compare-backends", "--model", "{d}/missing.pt"], "no such model file"),
        (["bench", "--model", "{d}/missing.pt"], "no such model file"),
    ],
)
def test_errors_are_one_sentence_exit_2(work, capsys, argv, message):
    d, model, _ = work
    rc, out, err = run(capsys, [a.format(d=d, model=model) for a in argv])
    assert rc == 2
    assert err.startswith("spleen-seg: error: ") and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_build_trt_without_tensorrt_says_what_to_run(exported, capsys, tmp_path):
    _, onnx_path, _ = exported
    ok, _ = tensorrt_available()
    if ok:
        pytest.skip("TensorRT is installed here: the build itself is exercised by tests/test_export.py")
    rc, _, err = run(capsys, ["build-trt", "--onnx", str(onnx_path), "--out", str(tmp_path / "m.engine"), "--fp16"])
    assert rc == 2
    assert "TensorRT" in err and "trtexec --onnx=" in err and "--fp16" in err and "--saveEngine=" in err
    assert not (tmp_path / "m.engine").exists()


def test_compare_backends_command(work, exported, capsys, tmp_path):
    d, model, image = work
    _, onnx_path, _ = exported
    data = tmp_path / "Mini"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    entries = []
    for i in range(2):
        img, lab, aff = make_phantom(20 + i, None, (6.0, 6.0, 7.0))
        nib.save(nib.Nifti1Image(img, aff), str(data / "imagesTr" / f"s_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(data / "labelsTr" / f"s_{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/s_{i}.nii.gz", "label": f"./labelsTr/s_{i}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"training": entries}))
    out = tmp_path / "cmp.json"
    argv = ["compare-backends", "--model", str(model), "--onnx", str(onnx_path), "--data", str(data), "--val-cases", "1", "--no-real", "--device", "cpu", "--json", str(out), "--quiet"]
    rc, text, _ = run(capsys, argv)
    assert rc == 0, text
    assert "torch-fp32 vs onnx-fp32" in text and "s_1" in text and "not run" in text
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["cases"]] == ["s_1"] and doc["summary"]["target"]["met"]


def test_bench_command(work, exported, capsys, tmp_path):
    _, model, _ = work
    _, onnx_path, _ = exported
    out, fig = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", str(model), "--onnx", str(onnx_path), "--no-end-to-end", "--batch-sizes", "1", "--patch-repeats", "1", "--patch", "32,32,32",
            "--device", "cpu", "--json", str(out), "--plot", str(fig), "--quiet"]
    rc, text, _ = run(capsys, argv)
    assert rc == 0, text
    assert "GFLOP per patch" in text and "onnx" in text and fig.stat().st_size > 1000
    doc = json.loads(out.read_text())
    assert {r["batch"] for r in doc["patch"]["rows"]} == {1} and "end_to_end" not in doc
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
        main(["bench", "--model", str(model), "--batch-sizes", "0"])
    assert e.value.code == 2 and "expected positive integers" in capsys.readouterr().err
