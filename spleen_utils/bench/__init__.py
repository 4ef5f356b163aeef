"""Latency, throughput, memory and end-to-end time, measured side by side in one run.

``spleen-seg bench`` (and notebook 08) call :func:`run_benchmark`, which records:

(a) **per patch**: one 96^3 patch at batch sizes 1, 2, 4 for each backend and precision (torch
    fp32, torch bf16 autocast on a CPU with native bf16, ONNX Runtime fp32; on CUDA torch fp32 and
    fp16 autocast, ONNX Runtime's CUDA provider and a TensorRT engine when present), after
    warm-up calls, as median and 10th / 90th percentiles of ``repeats`` timed calls;
(b) **end to end** on whole full-resolution CT files (load -> preprocess -> network -> back to
    the input grid -> write): the **baseline**, a faithful copy of the MONAI spleen tutorial's
    inference (:func:`baseline_predict`), against this library's default path
    (:class:`spleen_utils.infer.Predictor`), alternating the two so that both see the same
    machine load; the speed ratio of the medians and the Dice agreement of the two masks;
(c) **peak memory** of each measurement (RSS sampled every few ms; on CUDA
    ``torch.cuda.max_memory_allocated``);
(d) **FLOPs** of one 96^3 patch (``torch.utils.flop_counter.FlopCounterMode``) and the achieved
    FLOP/s, against the device's peak where a vendor figure is known ("unknown" otherwise) and
    against a large matrix product measured on the same machine;
(e) the hardware, library versions and the date.

The record is one JSON document (:data:`BENCH_FORMAT`); :func:`plot_benchmark` draws it.
Timings belong in these records, never in assertions.

The package, one module per part: :mod:`.measure` (peak memory, timed calls, FLOPs),
:mod:`.baseline` (the tutorial's pipeline), :mod:`.patch` (a), :mod:`.end_to_end` (b),
:mod:`.processes` (whole processes, start-up included), :mod:`.run` (the whole benchmark) and
:mod:`.report` (the record's format, text, Markdown and figure). ``python -m spleen_utils.bench
baseline`` runs the tutorial's inference as one process (:mod:`.__main__`).
"""

from __future__ import annotations

import importlib
from typing import Any

#: the names other modules, the tests and notebook 08 take from ``spleen_utils.bench``, and the
#: module of the package that holds each. They load on first use, so that importing one module
#: of the package (``bench.service_load``, the service's load test) does not import torch.
_EXPORTS = {
    "BENCH_FORMAT": "report",
    "PeakMemory": "measure",
    "baseline_predict": "baseline",
    "bench_end_to_end": "end_to_end",
    "bench_patches": "patch",
    "count_flops": "measure",
    "format_report": "report",
    "plot_benchmark": "report",
    "process_commands": "processes",
    "report_markdown": "report",
    "run_benchmark": "run",
    "summarize_times": "measure",
    "targets_markdown": "report",
    "time_calls": "measure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
