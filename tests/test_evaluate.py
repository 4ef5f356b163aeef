"""spleen_utils.evaluate: the real cases to judge on, predicting and scoring them, the component rules."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_utils import evaluate


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def test_real_cases_pairs_images_with_their_masks(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    for name in ("ct_a_image", "ct_a_label", "ct_b", "ct_b_spleen", "lonely"):
        _nii(tmp_path / f"{name}.nii.gz", a)
    pairs, why = evaluate.real_cases(tmp_path)
    assert [(p["name"], Path(p["label"]).name) for p in pairs] == [("ct_a", "ct_a_label.nii.gz"), ("ct_b", "ct_b_spleen.nii.gz")]
    assert why.startswith("2 real CT scan(s)")
    pairs, why = evaluate.real_cases(tmp_path / "absent")
    assert pairs == [] and "not a folder" in why


def test_real_cases_default_to_the_shipped_samples_and_add_ircad_only_for_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path))  # an empty folder: no validation-only scan
    pairs, why = evaluate.real_cases()
    assert [p["name"] for p in pairs] == ["msd_spleen_8", "totalseg_ct_3mm"] and all(p["shipped"] for p in pairs)
    assert all(Path(p["image"]).exists() and Path(p["label"]).exists() for p in pairs)
    pairs, why = evaluate.real_cases(validation=True)
    assert [p["name"] for p in pairs] == ["msd_spleen_8", "totalseg_ct_3mm"] and "ircad_1 is not here" in why


def test_lcc_effect_keeps_the_largest_component():
    raw = np.zeros((20, 20, 20), np.uint8)
    raw[2:10, 2:10, 2:10] = 1  # 512 voxels
    raw[15:17, 15:17, 15:17] = 1  # an island of 8
    label = np.zeros_like(raw)
    label[2:10, 2:10, 2:10] = 1
    before = raw.copy()
    kept, info = evaluate.lcc_effect(raw, label, (1.0, 1.0, 2.0))
    assert np.array_equal(raw, before)  # the raw mask is left as it was
    assert kept.sum() == 512 and info["components_before"] == 2 and info["components_after"] == 1
    assert info["voxels_removed"] == 8
    assert info["dice_after"] == 1.0 and info["dice_before"] < 1.0
    assert info["ml_after"] == pytest.approx(512 * 2 / 1000)


def test_predict_and_evaluate_items(tmp_path):
    img = _nii(tmp_path / "case_1.nii.gz", np.zeros((6, 6, 6), np.float32))
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    _nii(tmp_path / "case_1_label.nii.gz", lab)

    class FakePredictor:
        def predict_file(self, image, output):
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            _nii(Path(output), lab)
            return {"input": str(image), "output": str(output), "timings": {"total_s": 0.1}}

    items = [{"image": str(img), "label": str(tmp_path / "case_1_label.nii.gz")}]
    recs = evaluate.predict_items(FakePredictor(), items, tmp_path / "pred", tmp_path / "pred.json")
    assert recs[0]["name"] == "case_1" and json.loads((tmp_path / "pred.json").read_text())[0]["name"] == "case_1"
    ev = evaluate.evaluate_items(recs, items, tmp_path / "eval.json")
    assert ev["n"] == 1 and ev["mean_dice"] == 1.0 and ev["cases"][0]["name"] == "case_1"


def test_describe_grid_and_masks_on_grid(tmp_path):
    assert evaluate.describe_grid((1, 4, 5, 6), np.diag([-0.8, -0.8, 2.5, 1])) == "4 x 5 x 6 voxels of 0.8 x 0.8 x 2.5 mm, LPS"
    img = _nii(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), np.float32))
    good = _nii(tmp_path / "m.nii.gz", np.zeros((4, 4, 4), np.uint8))
    bad = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2, 1, 1, 1])), str(bad))
    assert evaluate.masks_on_grid([{"input": str(img), "output": str(good)}])
    assert not evaluate.masks_on_grid([{"input": str(img), "output": str(bad)}])
