"""The spleen-seg command: help, and one clear sentence (no traceback) for each user error."""

import subprocess
import sys

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


def test_predict_bad_inputs_leave_existing_output_intact(tmp_path, random_model):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(flat))
    text = tmp_path / "text.nii.gz"
    text.write_text("no")
    for src, msg in ((flat, "2D"), (text, "not a NIfTI"), (tmp_path / "missing.nii.gz", "no such file")):
        _assert_clean_error(run("predict", "--model", str(random_model), "--input", str(src), "--output", str(out)), msg)
        assert out.read_bytes() == b"precious"


def test_evaluate_missing_and_mismatch(tmp_path):
    _assert_clean_error(run("evaluate", "--pred", str(tmp_path / "p"), "--label", str(tmp_path / "l")), "no such file")
    a = np.zeros((8, 8, 8), np.uint8)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "p.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 9), np.uint8), np.eye(4)), str(tmp_path / "l.nii.gz"))
    _assert_clean_error(run("evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--label", str(tmp_path / "l.nii.gz")), "does not match")


def test_train_without_data_for_full_profile(tmp_path, capsys):
    rc = main(["train", "--profile", "full", "--data", str(tmp_path / "Task09_Spleen"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 2
    assert "spleen-seg data download" in capsys.readouterr().err


def test_download_offline_is_one_sentence(tmp_path):
    r = run("data", "download", "--root", str(tmp_path), "--url", "http://127.0.0.1:9/Task09_Spleen.tar", "--md5", "0" * 32)
    _assert_clean_error(r, "could not download")
    assert not any(tmp_path.iterdir())
