"""The whole benchmark: (a) to (e) of :mod:`spleen_utils.bench` in one run, and its record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import PROJECT_ROOT
from ..errors import SpleenError
from ..progress import report
from ..provenance import EXPORT_LIBRARIES, hardware, utc_now, versions, write_json
from ..runs import ONNX_MODEL, RunDir
from .end_to_end import _end_to_end_variants, bench_end_to_end
from .patch import bench_patches
from .processes import bench_processes
from .report import BENCH_FORMAT

DEFAULT_MODEL = RunDir(PROJECT_ROOT / "outputs" / "runs" / "quick").best_model


def run_benchmark(
    model_path: str | Path | None = None,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    images: Sequence[str | Path] | None = None,
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    patch_repeats: int | None = None,
    batch_sizes: Sequence[int] = (1, 2, 4),
    patches: bool = True,
    end_to_end: bool = True,
    window: str = "auto",
    precision: str = "auto",
    export_onnx_if_missing: bool = True,
    threads: int | None = None,
    patch: Sequence[int] | None = None,
    json_out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    processes: bool = True,
    process_image: str | Path | None = None,
    process_repeats: int | None = None,
) -> dict[str, Any]:
    """(a) to (e) of the module docstring in one run; returns (and with ``json_out`` writes) the record.

    ``processes``: also time each pipeline as a whole process (:func:`bench_processes`) on
    ``process_image`` (default: the largest of ``images``), ``process_repeats`` rounds (default
    ``repeats``).

    ``threads``: PyTorch's intra-op threads for the whole run, both pipelines alike (default:
    PyTorch's, one per core). On a machine whose cores other processes also use, fewer threads
    than cores can be faster for both: the record says which was used.

    ``images`` default to the real CT scans shipped in :mod:`spleen_utils.samples`; without
    images the end-to-end part is skipped with its reason. Without ``onnx_path`` the checkpoint
    is exported to a temporary ONNX file (validated) so that ONNX Runtime has its row.
    """

    if threads is not None and int(threads) < 1:
        raise SpleenError(f"threads must be a positive integer, not {threads}.")
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        return _run_benchmark(
            model_path, onnx_path, engine_path, images, device, repeats, warmup, patch_repeats, batch_sizes,
            patches, end_to_end, window, precision, export_onnx_if_missing, patch, json_out, progress,
            processes, process_image, process_repeats, threads,
        )
    finally:
        torch.set_num_threads(before)


def _run_benchmark(
    model_path, onnx_path, engine_path, images, device, repeats, warmup, patch_repeats, batch_sizes,
    patches, end_to_end, window, precision, export_onnx_if_missing, patch, json_out, progress,
    processes=False, process_image=None, process_repeats=None, threads=None,
) -> dict[str, Any]:
    from ..backends import file_sha256
    from ..model import read_checkpoint, resolve_device

    say = progress or (lambda s: None)
    model_path = Path(model_path or DEFAULT_MODEL)
    if not model_path.exists():
        raise SpleenError(f"{model_path}: no such model file; train one (`spleen-seg train`) or pass --model.")
    ckpt = read_checkpoint(model_path)
    dev = resolve_device(device)
    record: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "date": utc_now(),
        "hardware": hardware(dev),
        "versions": versions(EXPORT_LIBRARIES),
        "model": {
            "path": str(model_path),
            "sha256": file_sha256(model_path),
            "epoch": ckpt.get("epoch"),
            "val_dice": ckpt.get("best_metric", ckpt.get("val_dice")),
        },
        "settings": {"device": str(dev), "torch_threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup, "patch_repeats": patch_repeats or max(repeats, 5), "batch_sizes": list(batch_sizes)},
    }
    del ckpt
    parts, done = int(bool(patches)) + int(bool(end_to_end)), 0
    report("benchmark", 0, parts, unit="part")
    with tempfile.TemporaryDirectory(prefix="spleen-bench-") as tmp:
        onnx_note = None
        if onnx_path is None and export_onnx_if_missing and (patches or end_to_end):
            from ..export import export_onnx

            say("exporting the checkpoint to ONNX for the ONNX Runtime rows")
            onnx_path = Path(tmp) / ONNX_MODEL
            rep = export_onnx(model_path, onnx_path)
            onnx_note = f"exported for this run (max |ORT - torch| {max(rep['max_abs_diff'].values()):.2g})"
        if patches:
            say("timing one patch per backend and batch size")
            record["patch"] = bench_patches(
                model_path, onnx_path, engine_path, str(dev), batch_sizes, patch_repeats or max(repeats, 5), patch=patch
            )
            record["patch"]["onnx_file"] = onnx_note or (str(onnx_path) if onnx_path else None)
            done += 1
            report("benchmark", done, parts, unit="part", finished="per-patch latency")
        if end_to_end:
            if images is None:  # the real scans shipped with the library (spleen_utils.samples)
                from ..evaluate import real_cases

                images = [Path(c["image"]) for c in real_cases()[0]]
            if images:
                from ..infer import Predictor

                say("end to end: the tutorial's pipeline against the default path and each other backend / precision")
                default = Predictor.from_path(model_path, device=str(dev), precision=precision, window=window)
                twin = getattr(default.backend, "exported_from", None) is not None  # the default runs the checkpoint's ONNX export
                variants, not_run = _end_to_end_variants(model_path, None if twin else onnx_path, dev, window, torch_fp32=twin)
                record["end_to_end"] = bench_end_to_end(model_path, images, str(dev), repeats=repeats, warmup=warmup, progress=progress, predictor=default,
                                                        window=window, precision=precision, variants=variants, not_run=not_run)
                if processes:
                    from ..io import load_nifti

                    target = Path(process_image) if process_image else max(images, key=lambda f: int(np.prod(load_nifti(f).shape)))
                    say(f"whole processes on {Path(target).name}: start-up included")
                    proc = bench_processes(model_path, target, None if twin else onnx_path, repeats=process_repeats or repeats, warmup=1,
                                           threads=threads, progress=progress, torch_row=twin)
                    case = next((c for c in record["end_to_end"]["cases"] if c["file"] == Path(target).name), None)
                    if case is not None:  # start-up: a process's time beyond the same work in a warm process
                        proc["in_process_s"] = {"baseline": case["baseline"]["median_s"], "default": case["default"]["median_s"],
                                                **{v["label"].split()[0]: v["median_s"] for v in case["variants"] if v["label"] in ("onnx fp32", "torch fp32")}}
                        proc["startup_s"] = {k: proc["processes"][k]["median_s"] - v for k, v in proc["in_process_s"].items() if k in proc["processes"]}
                        proc["speedup_beyond_startup"] = {k: proc["in_process_s"]["baseline"] / v for k, v in proc["in_process_s"].items() if k != "baseline"}
                    record["end_to_end"]["whole_process"] = proc
            else:
                record["end_to_end"] = {"skipped": "no images were given"}
            done += 1
            report("benchmark", done, parts, unit="part", finished="end to end")
    record["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if json_out is not None:
        write_json(record, json_out)
    return record
