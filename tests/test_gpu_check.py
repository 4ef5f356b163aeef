"""The GPU check's CPU path (`spleen-seg gpu-check --device cpu --smoke`) runs end to end, so it cannot rot.

Its numbers mean nothing (toy sizes on a CPU); what is checked is that every part runs, writes a
labelled record, skips with a reason what needs a GPU, and never writes into book/records.
"""

import json
from pathlib import Path

import pytest

from spleen_utils.errors import SpleenError
from spleen_utils.gpu_check import PARTS, run_gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_on_cpu_measures_every_part_and_labels_its_records(tmp_path):
    lines = []
    res = run_gpu_check(device="cpu", smoke=True, records=tmp_path / "records", work=tmp_path / "work", say=lines.append)
    assert res["failed"] == [], (res["failed"], [res["results"][p].get("error") for p in res["failed"]])
    records = {json.loads(Path(p).read_text())["part"]: json.loads(Path(p).read_text()) for p in res["records"]}
    assert set(records) == set(PARTS)
    for rec in records.values():
        prov = rec["provenance"]
        assert prov["device"] == "cpu" and prov["smoke"] is True and prov["torch"] and prov["monai"]
        assert {"date", "driver", "cuda", "cudnn", "device_name"} <= set(prov)

    train = records["train"]
    assert train["resume"]["ok"] is True and train["resume"]["epochs"] == [1, 2, 3]
    assert len(train["seconds_per_epoch"]) == 3 and all(s > 0 for s in train["seconds_per_epoch"])
    assert train["peak_gpu_memory_mib"] is None  # no GPU: no number

    patch = records["patch"]
    rows = {(r["variant"], r["batch"]): r for r in patch["rows"]}
    assert {b for _, b in rows} == {1, 4}
    assert {v for v, _ in rows} == {"fp32", "fp16", "bf16", "channels_last", "torch_compile", "cuda_graphs"}
    for batch in (1, 4):
        assert rows[("fp32", batch)]["status"] == "ok" and rows[("fp32", batch)]["ms_per_patch"] > 0
        # what needs a GPU is skipped with its reason, never given a number
        assert rows[("cuda_graphs", batch)]["status"] == "skipped" and "CUDA" in rows[("cuda_graphs", batch)]["reason"]
        assert "ms_per_patch" not in rows[("fp16", batch)]

    e2e = records["e2e"]
    assert e2e["case"] == "totalseg_ct_3mm" and len(e2e["cases"]) == 1
    assert 0.0 <= e2e["dice_agreement_min"] <= 1.0 and 0.0 <= e2e["dice_vs_label"] <= 1.0
    assert e2e["cases"][0]["baseline"]["median_s"] > 0 and e2e["cases"][0]["default"]["median_s"] > 0
    assert any(line.startswith("e2e:") for line in lines)


def test_cpu_or_smoke_numbers_never_go_to_book_records(tmp_path):
    with pytest.raises(SpleenError, match="book/records"):
        run_gpu_check(device="cpu", smoke=True, records=ROOT / "book" / "records", work=tmp_path, parts=("patch",))
    assert not (ROOT / "book" / "records").exists() or not list((ROOT / "book" / "records").glob("gpu-check_*cpu*"))


def test_unknown_part_and_missing_model_are_one_sentence(tmp_path):
    with pytest.raises(SpleenError, match="unknown gpu-check part"):
        run_gpu_check(device="cpu", smoke=True, records=tmp_path, work=tmp_path, parts=("bogus",))
    with pytest.raises(SpleenError, match="needs a model"):
        run_gpu_check(device="cpu", smoke=True, records=tmp_path, work=tmp_path, parts=("e2e",))


def test_the_gpu_machine_script_and_make_targets_exist():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert "--no-index" in script and "gpu-check" in script  # offline install, then the command
    make = (ROOT / "Makefile").read_text()
    assert "gpu-wheels:" in make and "gpu-check:" in make and "monai==1.6.1" in make and "nibabel==5.4.2" in make
    assert "/gpu_wheels/" in (ROOT / ".gitignore").read_text()


def test_book_shows_only_real_gpu_records(tmp_path):
    from spleen_utils import gpu_check

    prov = {"device_name": "NVIDIA H200", "driver": "570.1", "cuda": "12.8", "torch": "2.13.0", "date": "2026-11-28T12:00:00+00:00", "smoke": False}
    rows = [{"variant": "fp16", "batch": 4, "status": "ok", "ms_per_patch": 0.8, "meets_goal": True},
            {"variant": "compile", "batch": 1, "status": "failed", "error": "RuntimeError: x"}]
    real = {"format": gpu_check.RECORD_FORMAT, "part": "patches", "provenance": prov, "rows": rows, "goal_ms_per_patch": 1.0}
    smoke = {**real, "provenance": {**prov, "smoke": True}}
    (tmp_path / "gpu-check_h200_1_patches.json").write_text(__import__("json").dumps(real))
    (tmp_path / "gpu-check_cpu_2_patches.json").write_text(__import__("json").dumps(smoke))
    (tmp_path / "gpu-check_broken.json").write_text("{not json")
    recs = gpu_check.book_records(tmp_path)
    assert [r["file"] for r in recs] == ["gpu-check_h200_1_patches.json"]
    md = gpu_check.patch_markdown(recs)
    assert "NVIDIA H200" in md and "2026-11-28" in md and "| fp16 | 4 | 0.800 | yes |" in md and "failed: RuntimeError" in md
    assert gpu_check.patch_markdown([]) == ""
