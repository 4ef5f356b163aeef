"""The ablation: four configurations, equal optimizer steps, and commands that reproduce each."""

import json

from spleen_utils import ablation
from spleen_utils.cli import build_parser, config_from_args
from spleen_utils.config import PROJECT_ROOT, get_config


def test_each_step_adds_one_ingredient_with_the_same_number_of_steps():
    steps = ablation.step_configs()
    assert [s[0] for s in steps] == ["phantoms", "+ appearance", "+ label maps", "+ real scan"]
    cfgs = [s[2] for s in steps]
    assert cfgs[0].appearance_prob == 0 and cfgs[1].appearance_prob > 0
    assert cfgs[0].train_sources == cfgs[1].train_sources == ("phantom",)
    assert cfgs[2].train_sources == ("phantom", "labelmap") and cfgs[2].real_train == ()
    assert cfgs[3] == get_config("quick")  # the last step is the quick profile itself
    # the plan's count is what training reads from the files (when they are here)
    from spleen_utils.data import datalists

    if cfgs[3].dataset_dir.joinpath("dataset.json").exists():
        assert ablation._steps_per_epoch(cfgs[3]) == -(-len(datalists(cfgs[3])[0]) // cfgs[3].batch_size)
    budget = [c.epochs * ablation._steps_per_epoch(c) for c in cfgs]
    assert max(budget) - min(budget) < max(ablation._steps_per_epoch(c) for c in cfgs), budget


def test_the_recorded_commands_rebuild_the_same_configurations():
    for name, _, cfg, cmd in ablation.step_configs():
        args = build_parser().parse_args(cmd[1:])
        rebuilt = config_from_args(args)
        assert (PROJECT_ROOT / rebuilt.out_dir).resolve() == cfg.out_dir.resolve()  # run from the project root
        assert {**rebuilt.to_dict(), "out_dir": None} == {**cfg.to_dict(), "out_dir": None}, name


def test_markdown_reads_the_record_or_says_it_is_missing(tmp_path):
    assert "has not been run" in ablation.markdown(tmp_path / "absent.json")
    record = {"command": "spleen-seg ablation", "date": "2026-11-28T09:00:00+00:00", "hardware": {"cpu": "X", "cpu_count": 2},
              "steps": [{"adds": "phantoms only", "epochs": 10, "optimizer_steps": 40, "best_val_dice": 0.9,
                         "command": "spleen-seg train --profile quick --epochs 10",
                         "real": {"ircad_1": {"dice": 0.1, "role": "never trained on", "label_source": "manual"}}}]}
    (tmp_path / "a.json").write_text(json.dumps(record))
    md = ablation.markdown(tmp_path / "a.json")
    assert "| phantoms only |" in md and "0.100" in md and "1. `spleen-seg train --profile quick --epochs 10`" in md
    assert "Measured on 2026-11-28" in md and "`ircad_1`: never trained on, manual label" in md


def test_a_record_of_other_profile_settings_says_so(tmp_path):
    base = {"command": "spleen-seg ablation", "date": "2026-11-28T09:00:00+00:00", "hardware": {"cpu": "X", "cpu_count": 2},
            "steps": [{"adds": "phantoms only", "epochs": 10, "optimizer_steps": 40, "best_val_dice": 0.9,
                       "command": "spleen-seg train --profile quick --epochs 10",
                       "real": {"ircad_1": {"dice": 0.1, "role": "never trained on", "label_source": "manual"}}}]}
    now = ablation.profile_settings()
    assert ablation.stale_note({**base, "quick_profile": now}) is None
    (tmp_path / "same.json").write_text(json.dumps({**base, "quick_profile": now}))
    assert "**Note.**" not in ablation.markdown(tmp_path / "same.json")
    older = {**now, "labelmap_cases": now["labelmap_cases"] + 3}
    (tmp_path / "older.json").write_text(json.dumps({**base, "quick_profile": older}))
    md = ablation.markdown(tmp_path / "older.json")
    assert "**Note.**" in md and f"labelmap_cases {older['labelmap_cases']!r} then, {now['labelmap_cases']!r} now" in md
    assert "predates" in ablation.stale_note(base)  # a record that stores no settings
    # a record from an older generator (the same settings make other cases): stale too
    other_generator = {**now, "generator_version": now["generator_version"] - 1}
    assert f"generator_version {now['generator_version'] - 1} then" in ablation.stale_note({**base, "quick_profile": other_generator})
    unrecorded = {k: v for k, v in now.items() if k != "generator_version"}
    assert f"generator_version {now['generator_version']!r} now, not recorded then" in ablation.stale_note({**base, "quick_profile": unrecorded})
