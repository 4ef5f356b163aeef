"""spleen_utils.reproduce: the notebooks' shared helpers, the run record, refreshing, the command."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pytest

from spleen_utils import reproduce
from spleen_utils.cli import main
from spleen_utils.config import get_config
from spleen_utils.errors import SpleenError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


# ---------------------------------------------------------------- helpers the notebooks share


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def test_real_cases_pairs_images_with_their_masks(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    for name in ("ct_a_image", "ct_a_label", "ct_b", "ct_b_spleen", "lonely"):
        _nii(tmp_path / f"{name}.nii.gz", a)
    pairs, why = reproduce.real_cases(tmp_path)
    assert [(p["name"], Path(p["label"]).name) for p in pairs] == [("ct_a", "ct_a_label.nii.gz"), ("ct_b", "ct_b_spleen.nii.gz")]
    assert why.startswith("2 real CT scan(s)")
    pairs, why = reproduce.real_cases(tmp_path / "absent")
    assert pairs == [] and "not a folder" in why


def test_real_cases_default_to_the_shipped_samples_and_add_ircad_only_for_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path))  # an empty folder: no validation-only scan
    pairs, why = reproduce.real_cases()
    assert [p["name"] for p in pairs] == ["msd_spleen_8", "totalseg_ct_3mm"] and all(p["shipped"] for p in pairs)
    assert all(Path(p["image"]).exists() and Path(p["label"]).exists() for p in pairs)
    pairs, why = reproduce.real_cases(validation=True)
    assert [p["name"] for p in pairs] == ["msd_spleen_8", "totalseg_ct_3mm"] and "ircad_1 is not here" in why


def test_real_data_dir_follows_the_environment(tmp_path, monkeypatch):
    from spleen_utils.samples import real_data_dir

    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path))
    assert real_data_dir() is None  # set, but holds no scan: not found (and no fall-back elsewhere)
    _nii(tmp_path / "x.nii.gz", np.zeros((2, 2, 2), np.uint8))
    assert real_data_dir() == tmp_path
    assert real_data_dir("x.nii.gz") == tmp_path and real_data_dir("totalseg_ct_3mm.nii.gz") is None
    monkeypatch.setenv("SPLEEN_REAL_DATA", str(tmp_path / "absent"))
    assert real_data_dir() is None


def test_lcc_effect_keeps_the_largest_component():
    raw = np.zeros((20, 20, 20), np.uint8)
    raw[2:10, 2:10, 2:10] = 1  # 512 voxels
    raw[15:17, 15:17, 15:17] = 1  # an island of 8
    label = np.zeros_like(raw)
    label[2:10, 2:10, 2:10] = 1
    before = raw.copy()
    kept, info = reproduce.lcc_effect(raw, label, (1.0, 1.0, 2.0))
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
    recs = reproduce.predict_items(FakePredictor(), items, tmp_path / "pred", tmp_path / "pred.json")
    assert recs[0]["name"] == "case_1" and json.loads((tmp_path / "pred.json").read_text())[0]["name"] == "case_1"
    ev = reproduce.evaluate_items(recs, items, tmp_path / "eval.json")
    assert ev["n"] == 1 and ev["mean_dice"] == 1.0 and ev["cases"][0]["name"] == "case_1"


# ---------------------------------------------------------------- train or reuse


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


def _fake_finished_run(cfg) -> None:
    from spleen_utils.data import dataset_checksums
    from spleen_utils.train import datalists

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
    summary, status = reproduce.train_or_reuse(tiny_dataset)
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
    _, status = reproduce.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [False] and status.startswith("trained") and "other data" in status
    aside = [p for p in Path(tiny_dataset.out_dir).parent.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and (aside[0] / "best_model.pt").read_bytes() == b"weights"


def test_an_interrupted_run_of_the_same_config_resumes(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    (Path(tiny_dataset.out_dir) / "summary.json").unlink()  # interrupted: no summary yet
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False, progress=True: calls.append(resume) or {"epochs": 2})
    _, status = reproduce.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [True] and status.startswith("resumed")


# ---------------------------------------------------------------- records and results


def test_headline_results_read_the_records(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "run_dir", lambda profile: tmp_path)
    rows = dict(reproduce.headline_results("quick"))
    assert rows["training"].startswith("not run")
    (tmp_path / "summary.json").write_text(json.dumps({
        "dataset": "Synthetic_Spleen", "synthetic": True, "n_train": 9, "n_val": 3, "device": "cpu", "precision": "bf16",
        "epochs": 40, "epochs_planned": 40, "best_val_dice": 0.8766, "best_epoch": 38, "train_seconds": 600,
        "real_train": ["msd_spleen_8"], "best_val_dice_by_source": {"labelmap": 0.86, "phantom": 0.89}}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "validation.json").write_text(json.dumps({"n": 3, "mean_dice": 0.85, "mean_hd95_mm": 4.25, "cases": []}))
    (tmp_path / "eval" / "real.json").write_text(json.dumps({"n": 3, "cases": [{"name": "msd_spleen_8", "dice": 0.77},
                                                                                {"name": "totalseg_ct_3mm", "dice": 0.91},
                                                                                {"name": "ircad_1", "dice": 0.87}]}))
    rows = dict(reproduce.headline_results("quick"))
    assert rows["best validation Dice"].startswith("0.877 at epoch 38")
    assert rows["held-out Dice / HD95"].startswith("0.850 / 4.2 mm")
    assert "per source labelmap 0.860, phantom 0.890" in rows["best validation Dice"]
    assert rows["data"].startswith("Synthetic_Spleen (synthetic) + real msd_spleen_8")
    # each real scan says what it was to the model (the quick profile's roles)
    assert rows["real CT Dice (original grid)"] == (
        "msd_spleen_8 0.770 (trained on), totalseg_ct_3mm 0.910 (held out: validated, never chose the checkpoint), "
        "ircad_1 0.870 (never trained on, validation only, not shipped)")
    md = reproduce.results_markdown("quick")
    assert md.startswith("| result | value |") and "| best validation Dice | 0.877" in md
    note = reproduce.profile_note("quick")
    assert "**generated** CT" in note and "not a clinical model" in note


def test_parse_parameters():
    assert reproduce.parse_parameters(["epochs=2", "run_dir=/tmp/x", "retrain=true", "min=null"]) == {
        "epochs": 2, "run_dir": "/tmp/x", "retrain": True, "min": None}
    with pytest.raises(SpleenError, match="key=value"):
        reproduce.parse_parameters(["epochs"])


def test_every_notebook_has_title_and_parameters():
    import papermill as pm

    paths = reproduce.notebook_paths()
    assert [p.name[:2] for p in paths] == [f"{i:02d}" for i in range(9)]
    for p in paths:
        nb = nbformat.read(str(p), as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and first.source.startswith("# "), p.name
        params = pm.inspect_notebook(str(p))
        assert "profile" in params and params["profile"]["default"] == '"quick"', p.name
        sources = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        for heading in ("## Overview", "## Prerequisites", "## Imports", "## Summary", "## What's next"):
            assert heading in sources, (p.name, heading)


# ---------------------------------------------------------------- refreshing the stored outputs


def _executed_copy(src: Path, dst: Path, injected: str = 'profile = "quick"\n') -> None:
    nb = nbformat.read(str(src), as_version=4)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("# Parameters\n" + injected)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)
    nb.metadata["papermill"] = {"parameters": {"profile": "quick"}}
    n = 0
    for c in nb.cells:
        c.metadata["papermill"] = {"duration": 1.0}
        c.metadata["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00"}
        if c.cell_type == "code":
            n += 1
            c.execution_count = n + 5
    nbformat.write(nb, str(dst))


def test_clean_notebook_strips_papermill(tmp_path):
    src = NOTEBOOKS / "00_setup.ipynb"
    _executed_copy(src, tmp_path / "x.ipynb")
    nb = reproduce.clean_notebook(nbformat.read(str(tmp_path / "x.ipynb"), as_version=4))
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert "papermill" not in nb.metadata
    assert all("papermill" not in c.metadata and "execution" not in c.metadata for c in nb.cells)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    assert [c.source for c in nb.cells] == [c.source for c in nbformat.read(str(src), as_version=4).cells]


def test_refresh_copies_only_a_default_parameter_run(tmp_path, monkeypatch):
    nbdir, executed = tmp_path / "notebooks", tmp_path / "executed"
    nbdir.mkdir()
    executed.mkdir()
    for p in reproduce.notebook_paths()[:2]:
        (nbdir / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(reproduce, "NOTEBOOKS_DIR", nbdir)
    with pytest.raises(SpleenError, match="run `make reproduce` first"):
        reproduce.refresh_notebooks("quick", executed, log=lambda s: None)
    time.sleep(0.01)
    names = [p.name for p in reproduce.notebook_paths()]
    for name in names:
        _executed_copy(nbdir / name, executed / name)
    record = {"profile": "quick", "notebooks": {n: {"parameters": {"profile": "quick"}} for n in names}}
    record["notebooks"][names[1]]["parameters"]["epochs"] = 2
    (executed / "reproduce.json").write_text(json.dumps(record))
    with pytest.raises(SpleenError, match="non-default parameters {'epochs': 2}"):
        reproduce.refresh_notebooks("quick", executed, log=lambda s: None)
    del record["notebooks"][names[1]]["parameters"]["epochs"]
    (executed / "reproduce.json").write_text(json.dumps(record))
    # a notebook edited after it was executed is refused, whatever the files' times
    original = (nbdir / names[0]).read_bytes()
    edited = nbformat.read(str(nbdir / names[0]), as_version=4)
    edited.cells[0].source += "\nedited after the run"
    nbformat.write(edited, str(nbdir / names[0]))
    for name in names:
        os.utime(executed / name, (time.time() + 5, time.time() + 5))
    with pytest.raises(SpleenError, match=f"{names[0]} changed after its executed copy"):
        reproduce.refresh_notebooks("quick", executed, log=lambda s: None)
    (nbdir / names[0]).write_bytes(original)
    for name in names:  # older executed copies of unchanged notebooks are current (a refresh rewrites the notebooks)
        os.utime(executed / name, (time.time() - 60, time.time() - 60))
    written = reproduce.refresh_notebooks("quick", executed, log=lambda s: None)
    assert reproduce.refresh_notebooks("quick", executed, log=lambda s: None)  # and again, right after
    assert [p.name for p in written] == names
    nb = nbformat.read(str(nbdir / names[0]), as_version=4)
    assert "papermill" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "spleen-seg"
    with pytest.raises(SpleenError, match="only the quick profile"):
        reproduce.refresh_notebooks("full", executed)


# ---------------------------------------------------------------- executing notebooks


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("raise ValueError('the phantom is missing')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "07_broken.ipynb"
    nbformat.write(nb, str(src))
    with pytest.raises(SpleenError) as err:
        reproduce.execute_notebook(src, tmp_path / "out" / src.name, {}, reproduce.ensure_kernel(), tmp_path)
    msg = str(err.value)
    assert msg.startswith("07_broken.ipynb failed at cell [2] with ValueError: the phantom is missing")
    assert (tmp_path / "out" / src.name).exists()


def test_cli_reports_unknown_notebooks_and_parameters(capsys):
    assert main(["reproduce", "--only", "99", "--no-book"]) == 2
    assert "no notebook matches 99" in capsys.readouterr().err
    assert main(["reproduce", "--only", "00", "--no-book", "-p", "nonsense=1"]) == 2
    assert "no notebook declares the parameter(s) nonsense" in capsys.readouterr().err


def test_prepare_dataset_generates_once_then_finds(tmp_path):
    cfg = get_config("quick", data_root=tmp_path, synthetic_cases=1, synthetic_test_cases=0, labelmap_cases=0, val_per_source=0)
    assert reproduce.prepare_dataset(cfg).startswith("generated Synthetic_Spleen")
    assert (cfg.dataset_dir / "dataset.json").exists()
    assert reproduce.prepare_dataset(cfg).startswith("found Synthetic_Spleen")


def test_describe_grid_and_masks_on_grid(tmp_path):
    assert reproduce.describe_grid((1, 4, 5, 6), np.diag([-0.8, -0.8, 2.5, 1])) == "4 x 5 x 6 voxels of 0.8 x 0.8 x 2.5 mm, LPS"
    img = _nii(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), np.float32))
    good = _nii(tmp_path / "m.nii.gz", np.zeros((4, 4, 4), np.uint8))
    bad = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2, 1, 1, 1])), str(bad))
    assert reproduce.masks_on_grid([{"input": str(img), "output": str(good)}])
    assert not reproduce.masks_on_grid([{"input": str(img), "output": str(bad)}])


def test_an_interrupted_run_on_other_data_is_not_resumed(tiny_dataset, monkeypatch):
    import spleen_utils.train as train_mod

    _fake_finished_run(tiny_dataset)
    (Path(tiny_dataset.out_dir) / "summary.json").unlink()
    _nii(tiny_dataset.dataset_dir / "imagesTr" / "s_1.nii.gz", np.full((4, 4, 4), 9, np.int16))  # regenerated data
    calls = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False, progress=True: calls.append(resume) or {"epochs": 2})
    _, status = reproduce.train_or_reuse(tiny_dataset, progress=False)
    assert calls == [False] and "other data" in status and "moved to run.previous-" in status
