"""(b') Whole processes: each pipeline as the command a user runs, start-up included."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import SpleenError
from .measure import summarize_times


def process_commands(model_path: str | Path, image: str | Path, out_dir: str | Path, onnx_path: str | Path | None = None,
                     torch_row: bool = False) -> list[tuple[str, list[str]]]:
    """``(label, argv)`` of each pipeline as one command, as a user runs it: the tutorial's
    (``python -m spleen_utils.bench baseline``: import torch and MONAI, load the checkpoint,
    :func:`baseline_predict`), ``spleen-seg predict`` on the checkpoint (the default path);
    with ``onnx_path``, ``spleen-seg predict`` on the ONNX file (no torch, no MONAI); with
    ``torch_row``, ``spleen-seg predict --backend torch`` on the checkpoint (for when the
    default runs the checkpoint's ONNX export)."""
    py, out_dir = sys.executable, Path(out_dir)
    predict = [py, "-m", "spleen_utils.cli", "predict", "--input", str(image)]
    cmds = [
        ("baseline", [py, "-m", "spleen_utils.bench", "baseline", "--model", str(model_path), "--input", str(image), "--output-dir", str(out_dir / "baseline")]),
        ("default", [*predict, "--model", str(model_path), "--output", str(out_dir / "default.nii.gz")]),
    ]
    if onnx_path is not None:
        cmds.append(("onnx", [*predict, "--model", str(onnx_path), "--output", str(out_dir / "onnx.nii.gz")]))
    if torch_row:
        cmds.append(("torch", [*predict, "--model", str(model_path), "--backend", "torch", "--output", str(out_dir / "torch.nii.gz")]))
    return cmds


def bench_processes(
    model_path: str | Path,
    image: str | Path,
    onnx_path: str | Path | None = None,
    repeats: int = 2,
    warmup: int = 1,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    torch_row: bool = False,
) -> dict[str, Any]:
    """Each pipeline as a whole process (:func:`process_commands`), start-up included: ``warmup``
    untimed rounds, then ``repeats`` rounds that alternate the commands (the same machine load
    for each); wall-clock medians and the ratio of the baseline's to each other's.
    ``threads`` sets ``OMP_NUM_THREADS`` (PyTorch's intra-op threads) for every process."""
    import subprocess

    say = progress or (lambda s: None)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(int(threads))
    image = Path(image)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="spleen-bench-proc-") as tmp:
        cmds = process_commands(model_path, image, tmp, onnx_path, torch_row)
        for i in range(warmup + repeats):
            for label, argv in cmds:
                say(f"{image.name}: process {label}, round {i + 1}/{warmup + repeats}")
                t0 = time.perf_counter()
                r = subprocess.run(argv, env=env, capture_output=True, text=True)
                dt_ = time.perf_counter() - t0
                if r.returncode != 0:
                    tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    raise SpleenError(f"the {label} process failed on {image.name} (exit {r.returncode}): {tail}")
                if i >= warmup:
                    times.setdefault(label, []).append(dt_)
    out: dict[str, Any] = {
        "image": image.name,
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        # each command with file names for paths (the full paths are this machine's)
        "commands": {label: " ".join("python" if a == sys.executable else Path(a).name if "/" in a else a for a in argv)
                     for label, argv in process_commands(model_path, image, "OUT", onnx_path, torch_row)},
        "processes": {label: summarize_times(v) for label, v in times.items()},
    }
    base = out["processes"]["baseline"]["median_s"]
    out["speedup"] = {label: base / v["median_s"] for label, v in out["processes"].items() if label != "baseline"}
    return out
