"""The spleen-seg command: help, and one clear sentence (no traceback) for each user error."""

import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from spleen_utils.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "spleen_utils.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("data", "train", "predict", "evaluate"):
        assert cmd in r.stdout


@pytest.mark.parametrize("sub", ["train", "predict", "evaluate", "data"])
def test_subcommand_help(sub):
    r = run(sub, "--help")
    assert r.returncode == 0 and "usage: spleen-seg" in r.stdout


def run_here(capsys, *args):
    """``main(args)`` in this process, as :func:`run`'s result: for commands that are run several times
    (each new process pays the torch import again). An exception other than the CLI's own error
    escapes ``main`` and fails the test, as a traceback in the process would."""
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def _assert_clean_error(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("spleen-seg: error:")
    for f in fragments:
        assert f in r.stderr, r.stderr


def test_predict_missing_model(tmp_path):
    _assert_clean_error(run("predict", "--model", str(tmp_path / "none.pt"), "--input", "x", "--output", "y"), "no such model file")


def test_predict_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _assert_clean_error(run("predict", "--model", str(bad), "--input", "x", "--output", "y"), "not a readable PyTorch checkpoint")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from spleen_utils.config import Recipe
    from spleen_utils.model import build_network, save_checkpoint

    path = tmp_path_factory.mktemp("m") / "m.pt"
    save_checkpoint(build_network(Recipe()), Recipe(), path)
    return path


def test_predict_bad_inputs_leave_existing_output_intact(tmp_path, random_model, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(flat))
    text = tmp_path / "text.nii.gz"
    text.write_text("no")
    for src, msg in ((flat, "2D"), (text, "not a NIfTI"), (tmp_path / "missing.nii.gz", "no such file")):
        _assert_clean_error(run_here(capsys, "predict", "--model", str(random_model), "--input", str(src), "--output", str(out)), msg)
        assert out.read_bytes() == b"precious"


def test_evaluate_missing_and_mismatch(tmp_path, capsys):
    _assert_clean_error(run_here(capsys, "evaluate", "--pred", str(tmp_path / "p"), "--label", str(tmp_path / "l")), "no such file")
    a = np.zeros((8, 8, 8), np.uint8)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "p.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 9), np.uint8), np.eye(4)), str(tmp_path / "l.nii.gz"))
    _assert_clean_error(run_here(capsys, "evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--label", str(tmp_path / "l.nii.gz")), "does not match")


def test_train_without_data_for_full_profile(tmp_path, capsys):
    rc = main(["train", "--profile", "full", "--data", str(tmp_path / "Task09_Spleen"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 2
    assert "spleen-seg data download" in capsys.readouterr().err


def test_download_offline_is_one_sentence(tmp_path):
    r = run("data", "download", "--root", str(tmp_path), "--url", "http://127.0.0.1:9/Task09_Spleen.tar", "--md5", "0" * 32)
    _assert_clean_error(r, "could not download")
    assert not any(tmp_path.iterdir())


def _ct(path, shape=(24, 24, 16), seed=0):
    """A small CT-like volume: air around a soft-tissue block, HU values."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000, np.int16)
    a[4:-4, 4:-4, 2:-2] = rng.integers(-100, 200, size=(shape[0] - 8, shape[1] - 8, shape[2] - 4))
    nib.save(nib.Nifti1Image(a, np.diag([3.0, 3.0, 4.0, 1.0])), str(path))
    return path


def _mask(path, shape=(24, 24, 16), values=(0, 1)):
    a = np.zeros(shape, np.uint8)
    a[8:12, 8:12, 4:8] = values[-1]
    nib.save(nib.Nifti1Image(a, np.diag([3.0, 3.0, 4.0, 1.0])), str(path))
    return path


def test_predict_refuses_a_file_name_for_a_folder_of_inputs(tmp_path, random_model, capsys):
    (tmp_path / "in").mkdir()
    _ct(tmp_path / "in" / "a.nii.gz")
    _assert_clean_error(run_here(capsys, "predict", "--model", str(random_model), "--input", str(tmp_path / "in"),
                            "--output", str(tmp_path / "m.nii.gz")), "give an output folder")
    assert not (tmp_path / "m.nii.gz").exists()


def test_predict_skips_masks_among_the_inputs_and_says_so(tmp_path, random_model, capsys):
    (tmp_path / "in").mkdir()
    _ct(tmp_path / "in" / "case_image.nii.gz")
    _mask(tmp_path / "in" / "case_label.nii.gz")  # a mask by name
    _mask(tmp_path / "in" / "other.nii.gz")  # a mask by content (MSD names labels like images)
    r = run_here(capsys, "predict", "--model", str(random_model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "case_label.nii.gz: skipped, its name says it is a mask" in r.stderr
    assert "other.nii.gz: skipped, its voxels are a label map" in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_image.nii.gz"]


def test_predict_on_a_mask_file_is_one_sentence(tmp_path, random_model, capsys):
    _assert_clean_error(run_here(capsys, "predict", "--model", str(random_model), "--input", str(_mask(tmp_path / "m.nii.gz")),
                            "--output", str(tmp_path / "o.nii.gz")), "holds a label map")
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_nifti_given_as_model_is_named_as_such(tmp_path, capsys):
    _assert_clean_error(run_here(capsys, "predict", "--model", str(_ct(tmp_path / "ct.nii.gz")), "--input", "x", "--output", "y"),
                        "is a NIfTI image, not a model file")


def test_evaluate_refuses_a_ct_as_label_and_names_a_missing_pred(tmp_path, capsys):
    ct, mask = _ct(tmp_path / "ct.nii.gz"), _mask(tmp_path / "mask.nii.gz")
    _assert_clean_error(run_here(capsys, "evaluate", "--pred", str(mask), "--label", str(ct)), "--label must be a binary spleen mask")
    _assert_clean_error(run_here(capsys, "evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--label", str(mask)),
                        "nope.nii.gz: no such file or folder (--pred)")
    _assert_clean_error(run_here(capsys, "evaluate", "--pred", str(_mask(tmp_path / "organs.nii.gz", values=(0, 3))), "--label", str(mask)),
                        "--pred must be a binary spleen mask")


def test_evaluate_names_the_case_after_the_prediction_and_has_no_mean_of_one(tmp_path, capsys):
    pred, label = _mask(tmp_path / "patient7.nii.gz"), _mask(tmp_path / "patient7_spleen.nii.gz")
    r = run_here(capsys, "evaluate", "--pred", str(pred), "--label", str(label))
    assert r.returncode == 0, r.stderr
    assert "patient7 " in r.stdout and "1.0000" in r.stdout
    assert "mean" not in r.stdout


def test_predict_says_when_the_model_is_a_teaching_model(tmp_path, capsys):
    from spleen_utils.config import Recipe
    from spleen_utils.model import build_network, save_checkpoint

    model = save_checkpoint(build_network(Recipe()), Recipe(), tmp_path / "q.pt", profile="quick",
                            training_data="Synthetic_Spleen (generated CT) + 1 real scan (msd_spleen_8)")
    r = run_here(capsys, "predict", "--model", str(model), "--input", str(_ct(tmp_path / "ct.nii.gz")), "--output", str(tmp_path / "o.nii.gz"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("a teaching model, not a clinical one") == 1


def test_help_has_examples_and_says_what_options_do():
    assert "examples" in run("--help").stdout
    out = run("train", "--help").stdout
    assert "examples" in out
    text = " ".join(out.split())
    for option, words in (("--profile {quick,full}", "quick (default)"), ("--epochs EPOCHS", "epochs to train"), ("--seed SEED", "random seed")):
        assert f"{option} {words}" in text, option  # the help text follows the option


def test_predict_hostile_headers_exit_2_with_one_line(tmp_path, random_model, capsys):
    """Issue #9: a bad extension size, a bad datatype code and a resampling bomb are one sentence and
    exit 2, not a traceback (nibabel's HeaderDataError) nor hours of resampling."""
    from hostile_corpus import hostile_corpus

    cases = {c.name: c for c in hostile_corpus(tmp_path / "corpus")}
    for name, words in [("ext_size_7", "extension"), ("bad_datatype", "datatype"), ("spacing_400mm_16cube", "voxel size")]:
        r = run_here(capsys, "predict", "--model", str(random_model), "--input", str(cases[name].path), "--output", str(tmp_path / "o.nii.gz"))
        _assert_clean_error(r, words)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o.nii.gz").exists()
