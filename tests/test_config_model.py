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
