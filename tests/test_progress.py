"""Progress reported by the long steps and printed by ``spleen-seg reproduce``."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat

from spleen_utils import progress, reproduce


def test_report_is_a_no_op_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report("training", 1, 10)  # nothing to write to, and no error
    assert list(tmp_path.iterdir()) == []


def test_report_appends_json_lines(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.report("training", 0, 3, unit="epoch")
    progress.report("training", 1, 3, unit="epoch", best_val_dice=0.5, skipped=None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["done"] for r in rows] == [0, 1]
    assert rows[1]["best_val_dice"] == 0.5 and "skipped" not in rows[1]


def test_describe_says_done_total_facts_and_time_left():
    line = progress.describe({"t": 130.0, "step": "training", "done": 10, "total": 50, "unit": "epoch",
                              "best_val_dice": 0.7134}, started=30.0)
    assert line.startswith("training: epoch 10/50")
    assert "best val Dice 0.713" in line
    assert "1:40 elapsed" in line and "about 6:40 left" in line
    assert "left" not in progress.describe({"t": 5.0, "step": "x", "done": 2, "total": 2}, started=0.0)


def test_the_watcher_prints_what_a_child_process_reports(tmp_path):
    """As in reproduce: the kernel is another process that inherits the variable."""
    lines: list[str] = []
    child = ("from spleen_utils.progress import report\n"
             "report('generating', 0, 3, unit='case')\n"
             "for i in range(1, 4): report('generating', i, 3, unit='case')\n")
    with progress.Watcher(tmp_path / "p.jsonl", log=lines.append, every=3600, poll=0.05):
        subprocess.run([sys.executable, "-c", child], check=True)
    assert progress.ENV not in __import__("os").environ  # restored afterwards
    # the first and the last report are always printed; the ones between wait for `every`
    assert len(lines) == 2, lines
    assert "generating: case 1/3" in lines[0] and "generating: case 3/3" in lines[1]


def test_a_resumed_step_counts_its_earlier_time(tmp_path):
    lines: list[str] = []
    with progress.Watcher(tmp_path / "p.jsonl", log=lines.append, poll=0.05) as w:
        (tmp_path / "p.jsonl").write_text(json.dumps({"t": 1000.0, "step": "training", "done": 5, "total": 10,
                                                      "unit": "epoch", "elapsed_s": 50.0}) + "\n")
        w.poll_once()
    assert "0:50 elapsed" in lines[0] and "about 0:50 left" in lines[0]


def test_skipped_steps_are_read_from_the_executed_notebooks(tmp_path, monkeypatch):
    for p in reproduce.notebook_paths():
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("print()")
        text = "all good\n"
        if p.name.startswith("06"):
            text = "skipped: no engine was built, because tensorrt is missing.\n"
        if p.name.startswith(("07", "08")):
            text = "  tensorrt     not run: tensorrt is missing\n"
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells = [cell]
        nbformat.write(nb, str(tmp_path / p.name))
    monkeypatch.setattr("spleen_utils.samples.validation_cases", lambda: [])
    found = reproduce.skipped_steps(tmp_path)
    assert found[0].startswith("06_tensorrt: no engine was built")
    assert sum("tensorrt is missing" in f for f in found) == 2  # 07 and 08 say the same: once
    assert found[-1].startswith("real-CT validation on ircad_1")
