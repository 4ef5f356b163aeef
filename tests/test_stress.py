"""The stressed versions of a scan: each keeps image and label on one grid and changes what it says."""
import numpy as np

from spleen_utils import stress
from spleen_utils.io import Volume


def _scan(z_sign: float = 1.0):
    image = np.zeros((20, 20, 30), np.float32)
    label = np.zeros(image.shape, bool)
    label[5:10, 5:10, 10:20] = True
    image[label] = 120.0
    affine = np.diag([1.0, 1.0, 2.0 * z_sign, 1.0])
    return Volume(image, affine, None), label


def test_every_version_keeps_image_and_label_on_one_grid():
    vol, label = _scan()
    for name, change in stress.PERTURBATIONS.items():
        v, lab = change(vol, label)
        assert v.shape == lab.shape and v.array.dtype == np.float32, name
        assert lab.any(), name
    assert np.allclose(stress.PERTURBATIONS["HU +30"](vol, label)[0].array, vol.array + 30)
    assert stress.PERTURBATIONS["noise 30 HU"](vol, label)[0].array.std() > vol.array.std()


def test_thicker_slices_and_a_cut_field_of_view():
    vol, label = _scan()
    vol = Volume(vol.array, np.diag([1.0, 1.0, 1.0, 1.0]), None)  # 1 mm slices: blocks of 5
    thick, lab = stress.PERTURBATIONS["5 mm slices"](vol, label)
    assert thick.shape[2] == 6 and np.isclose(thick.spacing[2], 5.0) and lab.sum() * 5 == label.sum()  # the same mL
    assert np.isclose((thick.affine @ np.r_[0, 0, 0, 1])[2], 2.0)  # the first block's centre
    for sign in (1.0, -1.0):  # the superior part goes, whichever way z runs through the array
        vol, label = _scan(sign)
        cut, lab = stress.PERTURBATIONS["top 40% cut"](vol, label)
        before, after = _world_z(vol, label), _world_z(cut, lab)
        assert 0.45 * label.sum() < lab.sum() < 0.8 * label.sum()
        assert after[0] == before[0] and after[1] < before[1] - 5  # same bottom, top 6+ mm lower


def _world_z(vol, label):
    ks = np.nonzero(label.any(axis=(0, 1)))[0]
    z = [(vol.affine @ np.r_[0, 0, k, 1])[2] for k in (ks.min(), ks.max())]
    return min(z), max(z)


def test_summary_counts_masks_without_spleen_per_rule():
    rows = [{"dice_largest": 0.0, "dice_kept": 0.9}, {"dice_largest": 0.8, "dice_kept": 0.8}]
    s = stress.summary(rows)
    assert s["masks"] == 2 and s["largest"]["no_spleen"] == 1 and s["kept"]["no_spleen"] == 0 and s["differ"] == 1
    assert np.isclose(s["largest"]["mean_dice"], 0.4) and np.isclose(s["kept"]["mean_dice"], 0.85)


def test_a_run_without_a_model_is_one_sentence(tmp_path, capsys):
    assert stress.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m spleen_utils.stress: error:") and "Traceback" not in err and len(err.splitlines()) == 1


def test_the_record_says_what_each_run_is(tmp_path):
    import json

    (tmp_path / "run.json").write_text(json.dumps({"config": {"profile": "quick", "seed": 1, "data_root": "/d"}}))
    (tmp_path / "summary.json").write_text(json.dumps({"best_epoch": 28, "train_seconds": 550.9}))
    assert stress.run_description(tmp_path) == {"profile": "quick", "seed": 1, "data": "/d", "best_epoch": 28,
                                                 "train_seconds": 550.9}
    assert set(stress.run_description(tmp_path / "absent").values()) == {None}  # nothing recorded: said so
