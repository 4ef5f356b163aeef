"""The recipe, the profiles, and self-describing checkpoints."""

import pytest
import torch

from spleen_utils.config import PROFILES, Recipe, get_config
from spleen_utils.errors import SpleenError
from spleen_utils.model import build_network, load_model, read_checkpoint, save_checkpoint


def test_recipe_is_the_monai_tutorial():
    r = Recipe()
    assert r.pixdim == (1.5, 1.5, 2.0) and r.hu_window == (-57.0, 164.0)
    assert r.channels == (16, 32, 64, 128, 256) and r.strides == (2, 2, 2, 2) and r.num_res_units == 2
    assert r.sw_roi == (160, 160, 160) and r.overlap == 0.25 and r.sw_batch_size == 4
    assert r.learning_rate == 1e-4


def test_profiles_change_only_sizes_and_counts():
    quick, full = get_config("quick"), get_config("full")
    assert full.recipe == Recipe()  # the full profile is the recipe, untouched
    differing = {f for f in Recipe.__dataclass_fields__ if getattr(quick.recipe, f) != getattr(full.recipe, f)}
    # voxel and crop sizes, crop count and the step size that fits a few hundred CPU steps
    assert differing <= {"pixdim", "patch_size", "num_samples", "learning_rate"}, differing
    assert full.dataset == "Task09_Spleen" and full.val_cases == 9
    assert set(PROFILES) == {"quick", "full"}


def test_overrides_and_errors():
    cfg = get_config("quick", epochs=3, pixdim=[2.0, 2.0, 2.0], device=None)
    assert cfg.epochs == 3 and cfg.recipe.pixdim == (2.0, 2.0, 2.0) and cfg.device == "auto"
    with pytest.raises(SpleenError, match="unknown profile"):
        get_config("medium")
    with pytest.raises(SpleenError, match="unknown setting"):
        get_config("quick", epoch=3)


def test_recipe_dict_round_trip():
    r = Recipe(pixdim=(1.0, 1.0, 1.0), channels=(8, 16, 32, 64, 128))
    assert Recipe.from_dict(r.to_dict()) == r


def test_checkpoint_round_trip(tmp_path):
    r = Recipe(channels=(8, 16, 32, 64, 128))
    net = build_network(r)
    save_checkpoint(net, r, tmp_path / "m.pt", epoch=7, best_metric=0.5)
    model, recipe, meta = load_model(tmp_path / "m.pt")
    assert recipe == r and meta["epoch"] == 7 and meta["labels"] == ["background", "spleen"]
    assert "torch" in meta["versions"] and "monai" in meta["versions"]
    x = torch.rand(1, 1, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), model(x))
    assert (tmp_path / "m.pt").stat().st_mode & 0o044  # readable like any other file
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(SpleenError, match="no such model"):
        read_checkpoint(tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SpleenError, match="not a readable"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SpleenError, match="not a spleen_utils checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_full_profile_trains_the_recipe_on_msd_alone_and_quick_adds_real_anatomy():

    full, quick = get_config("full"), get_config("quick")
    # full: MSD only, the recipe's constant learning rate, no generated data, no shipped scans
    assert full.lr_schedule == "constant" and full.appearance_prob == 0 and full.labelmap_cases == 0
    assert full.real_train == () and full.real_val == ()
    # quick: label-map cases, appearance randomisation, one real scan trained and one held out
    assert quick.labelmap_cases > 0 and 0 < quick.appearance_prob <= 1 and quick.lr_schedule == "cosine"
    assert quick.real_train == ("msd_spleen_8",) and quick.real_val == ("totalseg_ct_3mm",)
    assert not set(quick.real_train) & set(quick.real_val)  # the held-out scan never trains
    assert "ircad_1" not in quick.real_train + quick.real_val  # validation-only data never touches training
    assert quick.select_on == "generated"
    with pytest.raises(SpleenError, match="select_on"):
        get_config("quick", select_on="real")
    with pytest.raises(SpleenError, match="lr_schedule"):
        get_config("quick", lr_schedule="step")
    assert get_config("quick", real_train=[]).real_train == ()


# ----------------------------------------------------------------------------------------------
# a recipe read from a model file is validated (issue #9), as cpp/src/recipe.cpp validates it

import json  # noqa: E402

BAD_RECIPES = {  # case: (field, value)
    "hu_window_reversed": ("hu_window", (164.0, -57.0)),
    "hu_window_equal": ("hu_window", (100.0, 100.0)),
    "sw_roi_tiny": ("sw_roi", (8, 8, 8)),
    "sw_roi_zero": ("sw_roi", (0, 160, 160)),
    "sw_roi_not_multiple": ("sw_roi", (100, 160, 160)),
    "overlap_one": ("overlap", 1.0),
    "overlap_negative": ("overlap", -0.1),
    "overlap_nan": ("overlap", float("nan")),
    "pixdim_zero": ("pixdim", (1.5, 0.0, 2.0)),
    "pixdim_negative": ("pixdim", (1.5, -1.5, 2.0)),
    "pixdim_inf": ("pixdim", (1.5, float("inf"), 2.0)),
    "pixdim_two": ("pixdim", (1.5, 1.5)),
    "sw_batch_size_zero": ("sw_batch_size", 0),
    "labels_one": ("labels", ("spleen",)),
    "orientation_repeated": ("orientation", "RRS"),
    "strides_zero": ("strides", (2, 0, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_recipe_validate_refuses_what_cpp_refuses(case):
    key, value = BAD_RECIPES[case]
    d = Recipe().to_dict()
    d[key] = list(value) if isinstance(value, tuple) else value
    with pytest.raises(SpleenError, match=f"field '{key}'") as e:
        Recipe.from_model(d, "m.onnx")
    msg = str(e.value)
    assert msg.startswith("m.onnx: ") and msg.endswith(".") and "\n" not in msg


def test_recipe_validate_accepts_the_profiles():
    for profile in PROFILES:
        assert get_config(profile).recipe.validate() == get_config(profile).recipe
    tiny = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)
    assert Recipe.from_model(tiny.to_dict(), "x") == tiny
    with pytest.raises(SpleenError, match="recipe is missing"):
        Recipe.from_model(None, "x.pt")


def test_checkpoint_with_a_bad_recipe_is_refused(tmp_path):
    r = Recipe(channels=(8, 16, 32, 64, 128))
    path = save_checkpoint(build_network(r), r, tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["recipe"]["hu_window"] = [200.0, -100.0]
    torch.save(ckpt, tmp_path / "bad.pt")
    for fn in (read_checkpoint, load_model):
        with pytest.raises(SpleenError, match=r"bad.pt: the model's recipe field 'hu_window'"):
            fn(tmp_path / "bad.pt")
    ckpt["recipe"]["hu_window"] = [-57.0, 164.0]
    ckpt["recipe"]["overlap"] = 1.0
    torch.save(ckpt, tmp_path / "bad2.pt")
    from spleen_utils.backends import TorchBackend

    with pytest.raises(SpleenError, match="overlap"):
        TorchBackend(tmp_path / "bad2.pt", device="cpu")


def test_onnx_and_engine_metadata_with_a_bad_recipe_are_refused(tmp_path):
    from spleen_utils.artifact import ONNX_FORMAT
    from spleen_utils.artifact import ONNX_REQUIRED_KEYS as REQUIRED_KEYS
    from spleen_utils.artifact import parse_onnx_metadata as parse_metadata

    recipe = Recipe().to_dict()
    recipe["sw_roi"] = [4, 4, 4]
    props = {k: "{}" for k in REQUIRED_KEYS}
    props.update({"spleen_utils.format": ONNX_FORMAT, "recipe": json.dumps(recipe), "labels": "[]", "opset": "17",
                  "exporter": "x", "source_checkpoint_sha256": "0"})
    with pytest.raises(SpleenError, match="model.onnx: the model's recipe field 'sw_roi'"):
        parse_metadata(props, "model.onnx")
    props["recipe"] = json.dumps(Recipe().to_dict())
    assert parse_metadata(props, "model.onnx")["recipe"]["sw_roi"] == [160, 160, 160]


def test_pass_thresholds_come_from_the_profile_and_stay_out_of_the_run_record():
    from spleen_utils.config import PASS_THRESHOLDS

    quick, full = get_config("quick"), get_config("full")
    assert quick.pass_thresholds == {"val_dice": 0.70, "real_dice": 0.50}
    assert full.pass_thresholds == {"val_dice": 0.90, "real_dice": 0.80}
    assert set(PASS_THRESHOLDS) == set(PROFILES)
    # the run record compares to_dict(): a threshold there would make every finished run look different
    assert "pass_thresholds" not in quick.to_dict()
    quick.pass_thresholds["val_dice"] = 0.0  # a copy: the table is not changed through it
    assert get_config("quick").pass_thresholds["val_dice"] == 0.70


def test_notebook_setup_gives_the_config_the_run_folder_and_the_data_note(tmp_path):
    from spleen_utils.config import notebook_setup
    from spleen_utils.runs import RunDir

    cfg, run, note = notebook_setup("quick", device="cpu", epochs=3)
    assert cfg.epochs == 3 and cfg.device == "cpu"
    assert isinstance(run, RunDir) and run.path == cfg.out_dir
    assert note == " (synthetic quick-profile data)"
    cfg, run, note = notebook_setup("quick", run_dir=tmp_path)
    assert run.path == tmp_path and cfg.out_dir != tmp_path  # run_dir names the folder to read
    cfg, run, note = notebook_setup("full", out_dir=tmp_path / "full", device=None)
    assert run.path == tmp_path / "full" and cfg.device == "cuda" and note == ""
