"""spleen_utils.runs: the run folder, a profile's data, and training it once (or reusing a finished run)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_utils import runs
from spleen_utils.config import get_config


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.fixture()
def tiny_dataset(tmp_path):
    root = tmp_path / "data" / "Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = []
    for i in range(3):
        _nii(root / "imagesTr" / f"s_{i}.nii.gz", np.full((4, 4, 4), i, np.int16))
        _nii(root / "labelsTr" / f"s_{i}.nii.gz", np.zeros((4, 4, 4), np.uint8))
        items.append({"image": f"./imagesTr/s_{i}.nii.gz", "label": f"./labelsTr/s_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items, "test": []}))
    return get_config("quick", data_root=root.parent, dataset="Tiny", out_dir=tmp_path / "run", epochs=2, val_cases=1)


# ---------------------------------------------------------------- records and results


def _fake_finished_run(cfg) -> None:
    from spleen_utils.data import dataset_checksums
    from spleen_utils.data import datalists

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_model.pt").write_bytes(b"weights")
    (out / "last.pt").write_bytes(b"state")
    (out / "summary.json").write_text(json.dumps({"epochs": cfg.epochs, "best_val_dice": 0.9}))
    train_items, val_items = datalists(cfg)  # the dataset's cases and the shipped real scans
    (out / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "data_md5": dataset_checksums(train_items + val_items)}))


def test_a_finished_run_of_the_same_config_and_data_is_reused(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("must not train"))
    summary, status = runs.train_or_reuse(tiny_dataset)
    assert summary["best_val_dice"] == 0.9 and status.startswith("reused")


def test_changed_data_or_config_trains_and_keeps_the_old_run(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    calls = []

    def fake_train(cfg, resume=False, progress=True):
        calls.append(resume)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        return {"epochs": cfg.epochs, "best_val_dice": 0.5}

    monkeypatch.setattr(train_mod, "train", fake_train)
    _nii(tiny_dataset.dataset_dir / "imagesTr" / "s_0.nii.gz", np.full((4, 4, 4), 7, np.int16))  # the data changed
    _, status = runs.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [False] and status.startswith("trained") and "other data" in status
    aside = [p for p in Path(tiny_dataset.out_dir).parent.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and (aside[0] / "best_model.pt").read_bytes() == b"weights"


def test_an_interrupted_run_of_the_same_config_resumes(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    (Path(tiny_dataset.out_dir) / "summary.json").unlink()  # interrupted: no summary yet
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False, progress=True: calls.append(resume) or {"epochs": 2})
    _, status = runs.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [True] and status.startswith("resumed")


def test_prepare_dataset_generates_once_then_finds(tmp_path):
    cfg = get_config("quick", data_root=tmp_path, synthetic_cases=1, synthetic_test_cases=0, labelmap_cases=0, val_per_source=0)
    assert runs.prepare_dataset(cfg).startswith("generated Synthetic_Spleen")
    assert (cfg.dataset_dir / "dataset.json").exists()
    assert runs.prepare_dataset(cfg).startswith("found Synthetic_Spleen")


def test_an_interrupted_run_on_other_data_is_not_resumed(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    (Path(tiny_dataset.out_dir) / "summary.json").unlink()
    _nii(tiny_dataset.dataset_dir / "imagesTr" / "s_1.nii.gz", np.full((4, 4, 4), 9, np.int16))  # regenerated data
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False, progress=True: calls.append(resume) or {"epochs": 2})
    _, status = runs.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [False] and "other data" in status and "moved to run.previous-" in status
