"""spleen_utils.reproduce: the notebooks' shared helpers, the run record, refreshing, the command."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pytest

from spleen_utils import reproduce
from spleen_utils.cli import main
from spleen_utils.errors import SpleenError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_headline_results_read_the_records(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce.RunDir, "of", classmethod(lambda cls, profile: cls(tmp_path)))
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


