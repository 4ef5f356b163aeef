"""compare-backends: every backend on held-out and real cases, Dice against labels and between backends."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_utils.compare import (
    COMPARE_FORMAT,
    agreement_matrix,
    compare_backends,
    format_comparison,
    load_record,
    real_cases,
    validation_cases,
)
from spleen_utils.config import Recipe
from spleen_utils.errors import SpleenError
from spleen_utils.model import build_network, cpu_supports_bf16, save_checkpoint
from spleen_utils.synthetic import make_phantom

TINY = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2, pixdim=(3.0, 3.0, 4.0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random-weights model, its ONNX export and a 4-case MSD-layout dataset (2 held out)."""
    d = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    net = build_network(TINY)
    for m in net.modules():  # non-trivial batch-norm statistics: a network that is not all zeros
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model = save_checkpoint(net, TINY, d / "tiny.pt")
    from spleen_utils.export import export_onnx

    onnx_path = d / "tiny.onnx"
    export_onnx(model, onnx_path, opset=17, validate=False)
    data = d / "Tiny_Spleen"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    training = []
    for i in range(4):
        img, lab, aff = make_phantom(10 + i, None, (5.0, 5.0, 6.0))
        nib.save(nib.Nifti1Image(img, aff), str(data / "imagesTr" / f"spleen_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(data / "labelsTr" / f"spleen_{i}.nii.gz"))
        training.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"name": "Tiny", "training": training, "test": []}))
    return model, onnx_path, data


@pytest.fixture(scope="module")
def record(setup, tmp_path_factory):
    model, onnx_path, data = setup
    out = tmp_path_factory.mktemp("compare_out") / "compare.json"
    rec = compare_backends(model, onnx_path=onnx_path, data_dir=data, real_dir=False, device="cpu", val_cases=2, json_out=out)
    return rec, out


def test_cases_are_the_validation_split(setup):
    _, _, data = setup
    cases = validation_cases(data, 2)
    assert [c["name"] for c in cases] == ["spleen_2", "spleen_3"]  # the last two of the sorted list
    assert all(c["source"] == "validation" and c["label"].endswith(".nii.gz") for c in cases)


def test_record_and_json(record):
    rec, out = record
    doc = load_record(out)
    assert doc["format"] == COMPARE_FORMAT and doc["device"] == "cpu"
    assert {"date", "hardware", "versions", "model", "backends", "unavailable", "cases", "summary"} <= set(doc)
    expected = {"torch-fp32", "onnx-fp32"} | ({"torch-bf16"} if cpu_supports_bf16() else set())
    assert set(doc["backends"]) == expected
    unavailable = {m["key"] for m in doc["unavailable"]}
    assert "tensorrt" in unavailable and all(m["reason"] for m in doc["unavailable"])
    assert [c["name"] for c in doc["cases"]] == ["spleen_2", "spleen_3"]
    for c in doc["cases"]:
        assert set(c["dice"]) == expected and all(0.0 <= v <= 1.0 for v in c["dice"].values())
        assert c["label_voxels"] > 0
        assert len(c["agreement"]) == len(expected) * (len(expected) - 1) // 2
        for pair, v in c["agreement"].items():
            assert 0.0 <= v <= 1.0 and (v == 1.0) == (c["differing_voxels"][pair] == 0)
    keys, m = agreement_matrix(doc)
    assert m.shape == (len(keys), len(keys)) and np.allclose(np.diag(m), 1.0)


def test_torch_and_onnx_fp32_agree(record):
    rec, _ = record
    t = rec["summary"]["target"]
    assert t["pair"] == "torch-fp32|onnx-fp32" and t["threshold"] == 0.999
    assert t["met"], f"torch fp32 vs onnx fp32 agreement {t['min']:.5f}"
    text = format_comparison(rec)
    assert "torch-fp32 vs onnx-fp32" in text and "target" in text and "tensorrt" in text


def test_real_fixtures(setup, real_dir):
    model, onnx_path, _ = setup
    cases = real_cases(real_dir)
    assert {c["name"] for c in cases} == {"msd_spleen_8_image", "totalseg_ct_3mm"}
    rec = compare_backends(model, onnx_path=onnx_path, data_dir=False, real_dir=real_dir, device="cpu")
    assert [c["source"] for c in rec["cases"]] == ["real", "real"]
    assert rec["summary"]["target"]["met"], rec["summary"]["target"]
    for c in rec["cases"]:
        assert c["shape"] == list(nib.load(c["image"]).shape)


def test_errors(setup, tmp_path):
    model, onnx_path, data = setup
    with pytest.raises(SpleenError, match="nothing to compare"):
        compare_backends(model, onnx_path=onnx_path, data_dir=False, real_dir=False)
    with pytest.raises(SpleenError, match="no such model"):
        compare_backends(tmp_path / "none.pt", data_dir=data, real_dir=False)
    with pytest.raises(SpleenError, match="no such folder"):
        compare_backends(model, onnx_path=onnx_path, data_dir=False, real_dir=tmp_path / "nope")
    with pytest.raises(SpleenError):
        load_record(tmp_path / "missing.json")
