"""Integration: a few training epochs on a tiny synthetic set; the Dice must rise; resume works."""

import json

import pytest

from spleen_utils.config import get_config
from spleen_utils.errors import SpleenError
from spleen_utils.io import save_nifti
from spleen_utils.model import load_model
from spleen_utils.synthetic import make_phantom
from spleen_utils.train import train


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Four coarse phantoms (MSD layout) so that training takes seconds."""
    root = tmp_path_factory.mktemp("data") / "Tiny"
    items = []
    for i in range(1, 5):
        img, lab, aff = make_phantom(100 + i, spacing=(3.0, 3.0, 4.0))
        save_nifti(img, aff, root / "imagesTr" / f"spleen_{i}.nii.gz")
        save_nifti(lab, aff, root / "labelsTr" / f"spleen_{i}.nii.gz")
        items.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Tiny", "training": items, "test": []}))
    return root


def tiny_config(dataset, out, epochs):
    return get_config(
        "quick",
        data_root=dataset.parent,
        dataset=dataset.name,
        out_dir=out,
        epochs=epochs,
        val_cases=1,
        val_interval=1,
        batch_size=2,
        pixdim=(4.0, 4.0, 4.0),
        patch_size=(32, 32, 32),
        num_samples=2,
        sw_roi=(64, 64, 64),
        learning_rate=3e-3,
        channels=(8, 16, 32, 64, 128),
        device="cpu",
        amp=False,  # fp32: with bf16 this tiny net at lr 3e-3 hit a NaN loss (see the closing note)
    )


def test_training_raises_dice_and_writes_records(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "run", epochs=40)
    summary = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    dices = [r["val_dice"] for r in rows]
    # 80 steps lift this tiny net's Dice from ~0 to 0.65-0.8 (measured with 1 and 2 threads); a
    # broken loss, optimizer step or label pipeline leaves it flat
    assert max(dices[-10:]) > dices[0] + 0.25, dices
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert summary["best_val_dice"] == pytest.approx(max(dices))
    assert summary["best_epoch"] == 1 + dices.index(max(dices))
    for key in ("best_val_dice", "best_epoch", "epochs", "train_seconds", "profile", "device"):
        assert key in summary
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["split"] == {"train": ["spleen_1.nii.gz", "spleen_2.nii.gz", "spleen_3.nii.gz"], "val": ["spleen_4.nii.gz"]}
    assert len(run["data_md5"]) == 8 and run["versions"]["monai"]
    # the checkpoint describes itself: the network comes back from the file alone
    model, recipe, meta = load_model(tmp_path / "run" / "best_model.pt")
    assert recipe.channels == (8, 16, 32, 64, 128) and recipe.pixdim == (4.0, 4.0, 4.0)
    assert meta["epoch"] == summary["best_epoch"]


def test_resume_continues_history_and_best(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(tiny_dataset, out, epochs=3), progress=False)
    with pytest.raises(SpleenError, match="--resume"):
        train(tiny_config(tiny_dataset, out, epochs=5), progress=False)
    # a line cut by an interruption after the last checkpoint is dropped on resume
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 4, "loss": 0.5, "val_d')
    second = train(tiny_config(tiny_dataset, out, epochs=5), resume=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert second["best_val_dice"] >= first["best_val_dice"]
    assert second["epochs"] == 5


def test_resume_without_run_is_clear(tiny_dataset, tmp_path):
    with pytest.raises(SpleenError, match="nothing to resume"):
        train(tiny_config(tiny_dataset, tmp_path / "none", epochs=1), resume=True, progress=False)
