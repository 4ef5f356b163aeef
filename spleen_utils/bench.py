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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import PROJECT_ROOT, Recipe
from .errors import SpleenError
from .progress import report

BENCH_FORMAT = "spleen_utils.bench/1"
#: the patch timed in (a): the MONAI spleen recipe's training patch, as the MONAI bundle reports it
DEFAULT_PATCH = (96, 96, 96)
DEFAULT_MODEL = PROJECT_ROOT / "outputs" / "runs" / "quick" / "best_model.pt"
#: vendor peak throughput (dense, TFLOP/s) by GPU name fragment: (fp32, fp16/bf16 tensor cores)
GPU_PEAK_TFLOPS = {
    "H200": (67.0, 989.0),
    "H100 SXM": (67.0, 989.0),
    "H100 PCIe": (51.0, 756.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0),
    "A10": (31.2, 125.0),
    "RTX 3090": (35.6, 71.0),
    "RTX 4090": (82.6, 165.0),
    "T4": (8.1, 65.0),
}


# ----------------------------------------------------------------------------------------------
# where and when


def hardware_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, native bf16, GPU name (if any), OS."""
    import psutil

    from .model import cpu_supports_bf16

    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": psutil.cpu_count(logical=False),
        "cpu_threads": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_native": cpu_supports_bf16(),
        "cpu_isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        # other processes compete for the same cores: timings are only comparable side by side
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "device": str(device),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def versions() -> dict[str, str]:
    from .export import export_versions

    return export_versions()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# measuring


def _vm_hwm_bytes() -> int | None:
    """The kernel's peak resident set size of this process (``VmHWM``, Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory while the ``with`` block runs: RSS sampled by a thread, and CUDA's own peak.

    After the block: ``peak_rss_mb`` (highest RSS seen), ``rss_increase_mb`` (over the RSS at
    the start) and, on CUDA, ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated``).

    On Linux the kernel's own high-water mark is used too: it is reset at the start (writing 5 to
    ``/proc/self/clear_refs``) and read at the end (``VmHWM``), so a short allocation is seen even
    when a loaded machine does not schedule the sampling thread while it lives.
    """

    def __init__(self, cuda: bool = False, interval: float = 0.005):
        self.cuda = cuda and torch.cuda.is_available()
        self.interval = interval
        self.peak_rss_mb = self.rss_increase_mb = 0.0
        self.peak_gpu_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        import psutil

        self._proc = psutil.Process()
        try:  # reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self._start = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        if self._hwm:
            self._peak = max(self._peak, _vm_hwm_bytes() or 0)
        self.peak_rss_mb = self._peak / 2**20
        self.rss_increase_mb = (self._peak - self._start) / 2**20

    def record(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"peak_rss_mb": round(self.peak_rss_mb, 1), "rss_increase_mb": round(self.rss_increase_mb, 1)}
        if self.peak_gpu_mb is not None:
            out["peak_gpu_mb"] = round(self.peak_gpu_mb, 1)
        return out


def summarize_times(seconds: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles, min, max and count of a list of durations (seconds)."""
    a = np.asarray(seconds, dtype=np.float64)
    return {
        "median_s": float(np.median(a)),
        "p10_s": float(np.percentile(a, 10)),
        "p90_s": float(np.percentile(a, 90)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "n": int(a.size),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Durations of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (GPU-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def count_flops(model: torch.nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of one forward pass at input ``shape`` (``FlopCounterMode``: a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(tuple(shape), device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float | None:
    """GFLOP/s of an ``n x n`` matrix product on ``device``: a measured practical peak."""
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = time_calls(lambda: torch.mm(a, b), repeats, 1, device)
        return 2.0 * n**3 / float(np.median(times)) / 1e9
    except Exception:  # a dtype this device cannot multiply: no figure
        return None


def vendor_peak_gflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """``(GFLOP/s, source)``: the vendor's dense peak for a known GPU; ``(None, "unknown")`` else."""
    if device.type != "cuda":
        return None, "unknown (no vendor figure for this CPU; see matmul_gflops for a measured reference)"
    name = torch.cuda.get_device_name(device)
    for key, (fp32, half) in GPU_PEAK_TFLOPS.items():
        if key in name:
            tf = fp32 if precision == "fp32" else half
            return tf * 1e3, f"vendor datasheet, {key} {'fp32' if precision == 'fp32' else 'fp16/bf16 tensor core'} dense"
    return None, f"unknown (no datasheet figure for {name})"


# ----------------------------------------------------------------------------------------------
# the baseline: the MONAI spleen tutorial's inference, as the tutorial writes it


def baseline_transforms(recipe: Recipe):
    """The tutorial's ``val_org_transforms`` (image only): load, window, crop, orient, resample."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    a_min, a_max = recipe.hu_window
    return Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys="image", source_key="image"),
            Orientationd(keys="image", axcodes=recipe.orientation),
            Spacingd(keys="image", pixdim=recipe.pixdim, mode="bilinear"),
        ]
    )


def baseline_predict(
    model: torch.nn.Module,
    image_path: str | Path,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, dict[str, float]]:
    """The MONAI spleen tutorial's inference on one file, faithfully; the reference of the benchmark.

    ``LoadImaged -> EnsureChannelFirstd -> ScaleIntensityRanged -> CropForegroundd ->
    Orientationd -> Spacingd``, then fp32 ``sliding_window_inference`` (ROI 160^3, overlap 0.25,
    4 windows per batch: the recipe's ``sw_roi``, ``overlap``, ``sw_batch_size``), then
    ``Invertd`` on the two-channel output (``nearest_interp=False``), ``AsDiscreted(argmax)`` and
    ``SaveImaged`` (the tutorial's float32 output, ``<out_dir>/<case>/<case>_seg.nii.gz``).
    ``model`` is an fp32 network in eval mode on ``device``.

    Returns the uint8 mask on the input's grid and the stage times (``read_s``: ``LoadImaged``
    and ``EnsureChannelFirstd``; ``preprocess_s``: the other four; ``inference_s``, ``invert_s``
    (``Invertd`` and ``AsDiscreted``), ``write_s``, ``total_s``).
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged

    recipe = recipe or Recipe()
    device = torch.device(device)
    pre = baseline_transforms(recipe)
    post_invert = Compose(
        [
            Invertd(
                keys="pred",
                transform=pre,
                orig_keys="image",
                meta_keys="pred_meta_dict",
                orig_meta_keys="image_meta_dict",
                meta_key_postfix="meta_dict",
                nearest_interp=False,
                to_tensor=True,
            ),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    save = SaveImaged(keys="pred", meta_keys="pred_meta_dict", output_dir=str(out_dir), output_postfix="seg", resample=False, print_log=False)
    t: dict[str, float] = {}
    t0 = time0 = time.perf_counter()
    data = Compose(pre.transforms[:2])({"image": str(image_path)})  # the same chain, timed in two parts
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = Compose(pre.transforms[2:])(data)
    t["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        inputs = data["image"][None].to(device)
        data["pred"] = sliding_window_inference(inputs, tuple(recipe.sw_roi), recipe.sw_batch_size, model, overlap=recipe.overlap)[0]
    _sync(device)
    t["inference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data["pred"] = data["pred"].cpu()
    data = post_invert(data)
    t["invert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save(data)
    t["write_s"] = time.perf_counter() - t0
    t["total_s"] = time.perf_counter() - time0
    pred = data["pred"]
    mask = np.asarray((pred.as_tensor() if hasattr(pred, "as_tensor") else pred)[0].cpu().numpy(), dtype=np.uint8)
    return mask, t


# ----------------------------------------------------------------------------------------------
# (a) per patch


def _patch_runners(model_path: Path, onnx_path: Path | None, engine_path: Path | None, device: torch.device) -> tuple[list[dict], list[dict]]:
    """``([{backend, precision, device, fn}], [{backend, precision, reason}])``."""
    from .backends import OnnxBackend, TensorRTBackend, TorchBackend
    from .model import cpu_supports_bf16

    runners: list[dict] = []
    missing: list[dict] = []

    def add(backend: str, precision: str, make: Callable[[], Any]) -> None:
        try:
            b = make()
        except SpleenError as e:
            missing.append({"backend": backend, "precision": precision, "reason": str(e)})
            return
        from .infer import optimize_torch_backend  # as the Predictor runs it

        done = optimize_torch_backend(b)
        runners.append({"backend": backend, "precision": b.precision, "device": str(b.device), "optimizations": done, "fn": b})

    add("torch", "fp32", lambda: TorchBackend(model_path, device=str(device), precision="fp32"))
    if device.type == "cuda":
        add("torch", "fp16", lambda: TorchBackend(model_path, device=str(device), precision="fp16"))
    elif cpu_supports_bf16():
        add("torch", "bf16", lambda: TorchBackend(model_path, device="cpu", precision="bf16"))
    else:
        missing.append({"backend": "torch", "precision": "bf16", "reason": "this CPU has no native bf16 (AVX512-BF16 or AMX); emulated bf16 is slower than fp32"})
    if onnx_path is None:
        missing.append({"backend": "onnx", "precision": "fp32", "reason": "no ONNX file (pass --onnx, or let the benchmark export one)"})
    else:
        add("onnx", "fp32", lambda: OnnxBackend(onnx_path, device="cpu", precision="fp32"))
        if device.type == "cuda":  # ONNX Runtime's CUDA provider, when this onnxruntime build has it
            add("onnx", "fp32", lambda: OnnxBackend(onnx_path, device="cuda", precision="fp32"))
    if engine_path is None:
        from .export import tensorrt_available

        ok, reason = tensorrt_available()
        missing.append({"backend": "tensorrt", "precision": "fp16", "reason": "no engine given (pass --engine)" if ok else reason})
    else:
        add("tensorrt", "engine", lambda: TensorRTBackend(engine_path, device=str(device)))
    return runners, missing


def bench_patches(
    model_path: str | Path,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    device: str = "auto",
    batch_sizes: Sequence[int] = (1, 2, 4),
    repeats: int = 5,
    warmup: int = 2,
    patch: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Latency of one patch (default 96^3, :data:`DEFAULT_PATCH`) per backend, precision and batch size."""
    from .model import load_model, resolve_device

    dev = resolve_device(device)
    model, recipe, _ = load_model(model_path, "cpu")
    patch = tuple(int(v) for v in (patch or DEFAULT_PATCH))
    flops = count_flops(model, (1, 1, *patch))
    del model
    runners, missing = _patch_runners(Path(model_path), Path(onnx_path) if onnx_path else None, Path(engine_path) if engine_path else None, dev)
    from .model import cpu_supports_bf16

    # the half-precision reference only where the hardware runs it natively: on a CPU without
    # AVX512-BF16/AMX a 2048^2 bf16 product is emulated and took 32 s per call here (4 minutes of
    # the benchmark) for a figure that says nothing about this model
    half = "fp16" if dev.type == "cuda" else "bf16"
    native_half = dev.type == "cuda" or cpu_supports_bf16()
    reference = {
        "fp32": matmul_gflops(dev, torch.float32),
        half: matmul_gflops(dev, torch.float16 if dev.type == "cuda" else torch.bfloat16) if native_half else None,
    }
    rows = []
    g = torch.Generator().manual_seed(0)
    for r in runners:
        for bs in batch_sizes:
            x = torch.rand((bs, 1, *patch), generator=g)
            run_dev = torch.device(r["device"])
            x = x.to(run_dev)
            fn = r["fn"]
            try:
                with PeakMemory(cuda=run_dev.type == "cuda") as mem:
                    times = time_calls(lambda: fn(x), repeats, warmup, run_dev)
            except (RuntimeError, SpleenError) as e:  # out of memory, a shape outside an engine's profile
                missing.append({"backend": r["backend"], "precision": r["precision"], "batch": bs, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                continue
            s = summarize_times(times)
            achieved = flops * bs / s["median_s"] / 1e9
            peak, source = vendor_peak_gflops(run_dev, "fp32" if r["precision"] == "fp32" else "half")
            ref = reference.get("fp32" if r["precision"] == "fp32" else ("fp16" if run_dev.type == "cuda" else "bf16"))
            rows.append(
                {
                    "backend": r["backend"],
                    "precision": r["precision"],
                    "device": r["device"],
                    "optimizations": r["optimizations"],
                    "threads": torch.get_num_threads() if r["backend"] == "torch" else "the runtime's default",
                    "batch": bs,
                    "median_ms": 1e3 * s["median_s"],
                    "p10_ms": 1e3 * s["p10_s"],
                    "p90_ms": 1e3 * s["p90_s"],
                    "ms_per_patch": 1e3 * s["median_s"] / bs,
                    "patches_per_s": bs / s["median_s"],
                    "achieved_gflops": achieved,
                    "peak_gflops": peak,
                    "peak_source": source,
                    "fraction_of_peak": (achieved / peak) if peak else "unknown",
                    "fraction_of_matmul": (achieved / ref) if ref else None,
                    "repeats": repeats,
                    "warmup": warmup,
                    **mem.record(),
                }
            )
    return {
        "patch": list(patch),
        "flops_per_patch": flops,
        "gflops_per_patch": flops / 1e9,
        "batch_sizes": list(batch_sizes),
        "matmul_gflops": {k: v for k, v in reference.items()},
        "rows": rows,
        "unavailable": missing,
    }


# ----------------------------------------------------------------------------------------------
# (b) end to end


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    from .metrics import dice

    return dice(a, b)


def _lcc(mask: np.ndarray) -> np.ndarray:
    from monai.transforms import KeepLargestConnectedComponent

    # a copy: MONAI may filter in place, and the caller's mask is compared again afterwards
    out = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)(torch.from_numpy(mask.copy())[None])[0]
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.uint8)


#: the stages of both pipelines, in order: file -> arrays, arrays -> the model's grid, the
#: network, back to the input's grid (with the argmax / largest component), mask -> file
STAGES = ("read", "preprocess", "network", "invert", "write")
#: the agreement with the tutorial's masks the default path must reach on every case (issue 14)
AGREEMENT_TARGET = 0.99


def stage_times(t: dict[str, float]) -> dict[str, float]:
    """A pipeline's stage times (:func:`baseline_predict`'s or :meth:`Predictor.predict_file`'s
    keys) under the common names of :data:`STAGES`."""
    if "invert_s" in t:  # the baseline
        keys = ("read_s", "preprocess_s", "inference_s", "invert_s", "write_s")
    else:
        keys = ("load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s")
    return {name: float(t.get(k, float("nan"))) for name, k in zip(STAGES, keys)}


def bench_end_to_end(
    model_path: str | Path,
    images: Sequence[str | Path],
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    predictor=None,
    baseline_model: torch.nn.Module | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    window: str = "auto",
    precision: str = "auto",
    variants: Sequence[tuple[str, Any]] = (),
    not_run: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Whole files, the tutorial's pipeline (:func:`baseline_predict`) against the default path.

    For each image, ``warmup`` untimed runs of each pipeline, then ``repeats`` timed runs that
    alternate baseline and default (so both see the same machine load). ``predictor`` and
    ``baseline_model`` default to ``Predictor.from_path(model_path)`` (the default path, what
    ``spleen-seg predict --model`` the checkpoint runs: torch fp32, or the checkpoint's own ONNX
    export beside it, see :func:`spleen_utils.backends.onnx_twin`; another ``window`` or
    ``precision`` measures that choice instead) and the checkpoint's fp32 network.

    ``variants``: more ``(label, Predictor)`` pairs (another backend or precision), run in the
    same alternation; every pipeline's mask is compared with the tutorial's, and the record's
    ``agreement`` table has one row per backend and precision (``not_run``: rows that could not
    run here, with their reason).
    """
    from .infer import Predictor
    from .io import load_nifti
    from .model import load_model, resolve_device

    dev = resolve_device(device)
    if baseline_model is None:
        baseline_model, recipe, _ = load_model(model_path, dev)
    if predictor is None:
        predictor = Predictor.from_path(model_path, device=str(dev), precision=precision, window=window)
    recipe = predictor.recipe
    say = progress or (lambda s: None)
    cases = []
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="spleen-bench-"))
        out_dir = Path(out_dir)
        for image in images:
            image = Path(image)
            if not image.exists():
                raise SpleenError(f"{image}: no such image to benchmark.")
            vol = load_nifti(image)
            name = image.name.split(".")[0]
            base_dir, ours = out_dir / "baseline", out_dir / f"{name}_default.nii.gz"

            def run_baseline():
                return baseline_predict(baseline_model, image, base_dir, recipe, dev)

            def run_default():
                rec = predictor.predict_file(image, ours)
                return rec["timings"]

            extra = [(label, p, out_dir / f"{name}_v{j}.nii.gz") for j, (label, p) in enumerate(variants)]
            for _ in range(warmup):
                run_baseline()
                run_default()
                for _, p, path in extra:
                    p.predict_file(image, path)
            base_times, our_times, base_stages, our_stages = [], [], [], []
            base_mem, our_mem = [], []
            extra_times: list[list[dict[str, float]]] = [[] for _ in extra]
            for i in range(repeats):
                say(f"{image.name}: repeat {i + 1}/{repeats}, baseline")
                with PeakMemory(cuda=dev.type == "cuda") as m:
                    base_mask, st = run_baseline()
                base_times.append(st["total_s"])
                base_stages.append(st)
                base_mem.append(m.record())
                say(f"{image.name}: repeat {i + 1}/{repeats}, default path")
                with PeakMemory(cuda=dev.type == "cuda") as m:
                    st = run_default()
                our_times.append(st["total_s"])
                our_stages.append(st)
                our_mem.append(m.record())
                for (label, p, path), times in zip(extra, extra_times):
                    say(f"{image.name}: repeat {i + 1}/{repeats}, {label}")
                    times.append(p.predict_file(image, path)["timings"])
            if repeats == 0:
                base_mask, _ = run_baseline()
                run_default()
                for (_, p, path), times in zip(extra, extra_times):
                    times.append(p.predict_file(image, path)["timings"])
            our_mask = load_nifti(ours, what="mask", dtype=None).array.astype(np.uint8)
            ref = _lcc(base_mask) if predictor.lcc else base_mask
            others = []
            for (label, p, path), times in zip(extra, extra_times):
                m_ = load_nifti(path, what="mask", dtype=None).array.astype(np.uint8)
                r_ = _lcc(base_mask) if p.lcc else base_mask
                t_ = summarize_times([t["total_s"] for t in times])
                others.append({"label": label, "backend": p.description, "median_s": t_["median_s"], "n": t_["n"],
                               "stages_s": _median_stages([stage_times(t) for t in times]),
                               "dice_agreement": _dice(r_, m_), "differing_voxels": int((r_ != m_).sum()), "spleen_voxels": int(m_.sum())})
            bs, os_ = summarize_times(base_times or [float("nan")]), summarize_times(our_times or [float("nan")])
            prep = None
            try:
                from .infer import prepare

                p = prepare(vol, recipe)
                prep = list(p.image.shape) if p is not None and not isinstance(p, str) else None
            except Exception:  # geometry is informative only
                pass
            cases.append(
                {
                    "name": name,
                    "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                    "file": image.name,
                    "shape": list(vol.shape),
                    "spacing_mm": [round(s, 4) for s in vol.spacing],
                    "orientation": vol.axcodes,
                    "preprocessed_shape": prep,
                    "window_plan": predictor.window_plan(tuple(prep)) if prep else None,
                    "baseline": {**bs, "stages_median_s": _median_stages(base_stages), "memory": _max_memory(base_mem), "spleen_voxels": int(base_mask.sum())},
                    "default": {**os_, "stages_median_s": _median_stages(our_stages), "memory": _max_memory(our_mem), "spleen_voxels": int(our_mask.sum())},
                    # the same five stages for both pipelines (medians, seconds): STAGES
                    "stages_s": {"baseline": _median_stages([stage_times(t) for t in base_stages]),
                                 "default": _median_stages([stage_times(t) for t in our_stages])},
                    "variants": others,
                    "speedup": bs["median_s"] / os_["median_s"] if os_["median_s"] > 0 else None,
                    # one component kept on both sides (the tutorial has no connected-component filter; the
                    # default path keeps one: infer.keep_one_component, the largest unless a comparable rival
                    # is surer): what differs is the pipeline
                    "dice_agreement": _dice(_lcc(base_mask) if predictor.lcc else base_mask, our_mask),
                    # against the tutorial's own output, post-processing difference included
                    "dice_agreement_raw": _dice(base_mask, our_mask),
                    "differing_voxels": int((ref != our_mask).sum()),
                }
            )
    ratios = [c["speedup"] for c in cases if c["speedup"]]
    agreement = [{"pipeline": "default", "backend": predictor.description, "default": True,
                  "dice_by_case": {c["name"]: c["dice_agreement"] for c in cases},
                  "speedup_by_case": {c["name"]: c["speedup"] for c in cases}}]
    for j, (label, p) in enumerate(variants):
        agreement.append({"pipeline": label, "backend": p.description, "default": False,
                          "dice_by_case": {c["name"]: c["variants"][j]["dice_agreement"] for c in cases},
                          "speedup_by_case": {c["name"]: c["baseline"]["median_s"] / c["variants"][j]["median_s"] for c in cases}})
    for row in agreement:
        row["dice_min"] = min(row["dice_by_case"].values()) if cases else None
        row["meets_target"] = bool(cases) and row["dice_min"] >= AGREEMENT_TARGET
    return {
        "baseline": {
            "what": "MONAI spleen tutorial inference: LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged, CropForegroundd, "
            "Orientationd, Spacingd; fp32 sliding_window_inference; Invertd (2 channels, bilinear); AsDiscreted(argmax); SaveImaged",
            "roi": list(recipe.sw_roi),
            "overlap": recipe.overlap,
            "sw_batch_size": recipe.sw_batch_size,
            "precision": "fp32",
            "device": str(dev),
        },
        "default": {
            "what": "spleen_utils.infer.Predictor defaults (see its module docstring)",
            "backend": predictor.description,
            "window": predictor.window,
            "max_window_voxels": predictor.max_window_voxels,
            "preprocess": predictor.preprocess,
            "lcc": predictor.lcc,
        },
        "repeats": repeats,
        "warmup": warmup,
        "cases": cases,
        "stages": list(STAGES),
        # one row per backend and precision: its masks against the tutorial's fp32 masks
        "agreement": agreement,
        "agreement_target": AGREEMENT_TARGET,
        "agreement_not_run": list(not_run),
        "speedup_min": min(ratios) if ratios else None,
        "speedup_geomean": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        "dice_agreement_min": min(c["dice_agreement"] for c in cases) if cases else None,
    }


def _median_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    if not stages:
        return {}
    return {k: float(np.median([s[k] for s in stages])) for k in stages[0]}


def _max_memory(records: list[dict]) -> dict[str, float]:
    if not records:
        return {}
    return {k: max(r[k] for r in records if r.get(k) is not None) for k in records[0] if any(r.get(k) is not None for r in records)}


# ----------------------------------------------------------------------------------------------
# (b') whole processes: start-up included


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


def _baseline_main(argv: Sequence[str] | None = None) -> int:
    """``python -m spleen_utils.bench baseline --model M --input CT --output-dir D``: the tutorial's
    inference as one process (what :func:`bench_processes` times against ``spleen-seg predict``)."""
    import argparse

    from .model import load_model

    ap = argparse.ArgumentParser(prog="python -m spleen_utils.bench", description="the MONAI spleen tutorial's inference, one file, as a process")
    ap.add_argument("what", choices=["baseline"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output-dir", required=True)
    a = ap.parse_args(argv)
    from .model import resolve_device

    dev = resolve_device("auto")  # as the tutorial: the GPU when there is one
    model, recipe, _ = load_model(a.model, dev)
    mask, t = baseline_predict(model, a.input, a.output_dir, recipe, dev)
    print(f"{Path(a.input).name}: {int(mask.sum())} spleen voxels ({t['total_s']:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# the whole benchmark


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
    from .backends import file_sha256
    from .model import read_checkpoint, resolve_device

    say = progress or (lambda s: None)
    model_path = Path(model_path or DEFAULT_MODEL)
    if not model_path.exists():
        raise SpleenError(f"{model_path}: no such model file; train one (`spleen-seg train`) or pass --model.")
    ckpt = read_checkpoint(model_path)
    dev = resolve_device(device)
    record: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "date": utc_now(),
        "hardware": hardware_info(dev),
        "versions": versions(),
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
            from .export import export_onnx

            say("exporting the checkpoint to ONNX for the ONNX Runtime rows")
            onnx_path = Path(tmp) / "model.onnx"
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
                from .reproduce import real_cases

                images = [Path(c["image"]) for c in real_cases()[0]]
            if images:
                from .infer import Predictor

                say("end to end: the tutorial's pipeline against the default path and each other backend / precision")
                default = Predictor.from_path(model_path, device=str(dev), precision=precision, window=window)
                twin = getattr(default.backend, "exported_from", None) is not None  # the default runs the checkpoint's ONNX export
                variants, not_run = _end_to_end_variants(model_path, None if twin else onnx_path, dev, window, torch_fp32=twin)
                record["end_to_end"] = bench_end_to_end(model_path, images, str(dev), repeats=repeats, warmup=warmup, progress=progress, predictor=default,
                                                        window=window, precision=precision, variants=variants, not_run=not_run)
                if processes:
                    from .io import load_nifti

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


def _end_to_end_variants(model_path, onnx_path, dev: torch.device, window: str, torch_fp32: bool = False) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """The other backends and precisions timed end to end beside the default: torch fp32 when
    ``torch_fp32`` (the default runs the checkpoint's ONNX export), else ONNX Runtime fp32 when
    there is an ONNX file; torch bf16 autocast where the CPU runs it natively (fp16 on CUDA).
    The rest is listed with the reason it did not run."""
    from .infer import Predictor
    from .model import cpu_supports_bf16

    variants: list[tuple[str, Any]] = []
    not_run: list[dict[str, str]] = []
    if torch_fp32:
        variants.append(("torch fp32", Predictor.from_path(model_path, backend="torch", device=str(dev), precision="fp32", window=window)))
    elif onnx_path is not None:
        variants.append(("onnx fp32", Predictor.from_path(onnx_path, backend="onnx", device="cpu" if dev.type == "cpu" else "auto", window=window)))
    else:
        not_run.append({"pipeline": "onnx fp32", "reason": "no ONNX file"})
    if dev.type == "cuda":
        variants.append(("torch fp16", Predictor.from_path(model_path, backend="torch", device=str(dev), precision="fp16", window=window)))
        not_run.append({"pipeline": "torch bf16", "reason": "not measured on CUDA (fp16 is CUDA's half precision here)"})
    elif cpu_supports_bf16():
        variants.append(("torch bf16", Predictor.from_path(model_path, backend="torch", device="cpu", precision="bf16", window=window)))
    else:
        not_run.append({"pipeline": "torch bf16", "reason": "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated, it would take minutes per volume"})
    return variants, not_run


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    from .io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------
# reading it


def stage_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case and pipeline: the median seconds of each of :data:`STAGES` and their sum."""
    rows = []
    for c in record.get("end_to_end", {}).get("cases", []):
        for who in ("baseline", "default"):
            st = c.get("stages_s", {}).get(who)
            if st:
                rows.append({"case": c["name"], "pipeline": who, **{k: st[k] for k in STAGES}, "sum": sum(st[k] for k in STAGES)})
    return rows


def agreement_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backend and precision: its masks' Dice with the tutorial's on each case, the
    minimum, whether it meets :data:`AGREEMENT_TARGET`, and its speed-up per case."""
    e = record.get("end_to_end", {})
    rows = []
    for a in e.get("agreement", []):
        row = {"pipeline": a["pipeline"] + (" (the default)" if a["default"] else ""), "backend": a["backend"]}
        row.update({f"Dice {k}": v for k, v in a["dice_by_case"].items()})
        row["min Dice"] = a["dice_min"]
        row[f">= {e.get('agreement_target', AGREEMENT_TARGET)}"] = "yes" if a["meets_target"] else "no"
        row.update({f"speed-up {k}": v for k, v in a["speedup_by_case"].items()})
        rows.append(row)
    return rows


def process_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pipeline timed as a whole process: median wall time, the same work in a warm
    process, the difference (start-up), and the baseline's time over each."""
    w = record.get("end_to_end", {}).get("whole_process")
    if not w:
        return []
    rows = []
    for k, v in w["processes"].items():
        rows.append({"pipeline": k, "command": w["commands"].get(k, ""), "process s": v["median_s"],
                     "in a warm process s": w.get("in_process_s", {}).get(k), "start-up s": w.get("startup_s", {}).get(k),
                     "speed-up, whole process": w["speedup"].get(k) if k != "baseline" else None,
                     "speed-up, beyond start-up": w.get("speedup_beyond_startup", {}).get(k) if k != "baseline" else None})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _text_table(rows: list[dict[str, Any]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    out = [indent + "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    out += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return out


def format_report(record: dict[str, Any]) -> str:
    """The record as the text ``spleen-seg bench`` prints."""
    hw = record.get("hardware", {})
    lines = [
        f"spleen-seg bench, {record.get('date')}",
        f"hardware: {hw.get('cpu')} ({hw.get('cpu_cores')} cores, {hw.get('cpu_threads')} threads, torch threads {hw.get('torch_threads')}, "
        f"native bf16: {'yes' if hw.get('cpu_bf16_native') else 'no'})" + (f"; GPU {hw['gpu']}" if hw.get("gpu") else "; no GPU"),
    ]
    if hw.get("load_average_1min") is not None:
        lines.append(
            f"load average (1 min): {hw['load_average_1min']} at the start, {record.get('load_average_1min_end')} at the end "
            f"(other processes share these {hw.get('cpu_threads')} CPUs: compare numbers side by side only)"
        )
    p = record.get("patch")
    if p:
        lines.append("")
        lines.append(f"(a) one {'x'.join(map(str, p['patch']))} patch: {p['gflops_per_patch']:.1f} GFLOP per patch (FlopCounterMode)")
        mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p["matmul_gflops"].items() if v)
        lines.append(f"    reference: a 2048^2 matrix product here runs at {mm}")
        lines.append(f"    {'backend':<9}{'precision':<10}{'device':<8}{'batch':>5}{'median ms':>11}{'p10':>9}{'p90':>9}{'ms/patch':>10}{'GFLOP/s':>9}{'peak RSS MB':>12}")
        for r in p["rows"]:
            mem = r.get("peak_gpu_mb", r.get("peak_rss_mb"))
            lines.append(
                f"    {r['backend']:<9}{r['precision']:<10}{r['device']:<8}{r['batch']:>5}{r['median_ms']:>11.1f}{r['p10_ms']:>9.1f}"
                f"{r['p90_ms']:>9.1f}{r['ms_per_patch']:>10.1f}{r['achieved_gflops']:>9.1f}{mem:>12.0f}"
            )
        if p["rows"]:
            r0 = p["rows"][0]
            frac = r0["fraction_of_peak"]
            lines.append(f"    fraction of the device's peak: {frac if isinstance(frac, str) else f'{frac:.1%}'}")
        for m in p["unavailable"]:
            lines.append(f"    not run: {m['backend']} {m['precision']}{' batch ' + str(m['batch']) if 'batch' in m else ''}: {m['reason']}")
    e = record.get("end_to_end")
    if e:
        lines.append("")
        if "skipped" in e:
            lines.append(f"(b) end to end: skipped, {e['skipped']}")
        else:
            lines.append(f"(b) end to end, load -> write, median of {e['repeats']} alternating runs after {e['warmup']} warm-up")
            lines.append(f"    baseline: {e['baseline']['what']} (ROI {e['baseline']['roi']}, overlap {e['baseline']['overlap']}, {e['baseline']['precision']})")
            lines.append(f"    default:  {e['default']['backend']}, window {e['default']['window']}, preprocess {e['default']['preprocess']}, lcc {e['default']['lcc']}")
            lcc = e["default"]["lcc"]
            lines.append(
                f"    {'case':<22}{'shape':<14}{'window':<9}{'baseline s':>11}{'default s':>11}{'speedup':>9}{'Dice':>8}{'(voxels)':>10}"
                f"{'Dice raw':>10}{'RSS MB b/d':>13}"
            )
            plan_names = {"whole": "one", "sliding": "sliding"}
            for c in e["cases"]:
                b, d = c["baseline"], c["default"]
                rss = f"{b['memory'].get('peak_rss_mb', 0):.0f}/{d['memory'].get('peak_rss_mb', 0):.0f}"
                lines.append(
                    f"    {c['name']:<22}{'x'.join(map(str, c['shape'])):<14}{plan_names.get(c.get('window_plan'), '-'):<9}{b['median_s']:>11.2f}"
                    f"{d['median_s']:>11.2f}{c['speedup']:>8.2f}x{c['dice_agreement']:>8.4f}{c['differing_voxels']:>10}"
                    f"{c['dice_agreement_raw']:>10.4f}{rss:>13}"
                )
            lines.append(
                "    Dice: the two masks" + (" with one component kept on both (the largest of the tutorial's, the predictor's choice of ours)" if lcc else "") + "; "
                "Dice raw: against the tutorial's own output"
            )
            lines.append(f"    speedup: min {e['speedup_min']:.2f}x, geometric mean {e['speedup_geomean']:.2f}x; Dice agreement min {e['dice_agreement_min']:.4f}")
            if stage_rows(record):
                lines.append("    seconds per stage (medians):")
                lines += _text_table(stage_rows(record), "      ")
            if agreement_rows(record):
                lines.append(f"    agreement with the tutorial's fp32 masks, per backend and precision (target: Dice >= {e.get('agreement_target')} on every case):")
                lines += _text_table(agreement_rows(record), "      ")
                for m in e.get("agreement_not_run", []):
                    lines.append(f"      not run: {m['pipeline']}: {m['reason']}")
            if process_rows(record):
                w = e["whole_process"]
                lines.append(f"    whole processes on {w['image']}, start-up included (median of {w['repeats']} alternating rounds after {w['warmup']}):")
                lines += _text_table(process_rows(record), "      ")
    return "\n".join(lines)


def report_markdown(record: dict[str, Any]) -> str:
    """The record as Markdown (what notebook 08 shows): a few sentences and two tables that wrap in a page."""
    from .viz import markdown_table

    hw = record.get("hardware", {})
    where = f"{hw.get('cpu')} ({hw.get('cpu_cores')} cores, torch threads {hw.get('torch_threads')}, native bf16: " \
            f"{'yes' if hw.get('cpu_bf16_native') else 'no'})" + (f", GPU {hw['gpu']}" if hw.get("gpu") else ", no GPU")
    parts = [f"Measured on {where}, {record.get('date')}."]
    if hw.get("load_average_1min") is not None:
        parts[0] += (f" Load average (1 min) {hw['load_average_1min']} at the start and {record.get('load_average_1min_end')} "
                     "at the end: other processes share these CPUs, so compare numbers side by side only.")
    p = record.get("patch")
    if p:
        mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p["matmul_gflops"].items() if v)
        parts.append(f"**(a) One {'×'.join(map(str, p['patch']))} patch**: {p['gflops_per_patch']:.1f} GFLOP per patch; "
                     f"a 2048² matrix product here runs at {mm}.")
        rows = [{"backend": r["backend"], "precision": r["precision"], "device": r["device"], "batch": r["batch"],
                 "median ms": r["median_ms"], "p10 ms": r["p10_ms"], "p90 ms": r["p90_ms"], "ms per patch": r["ms_per_patch"],
                 "GFLOP/s": r["achieved_gflops"], "peak MB": float(r.get("peak_gpu_mb", r.get("peak_rss_mb")) or 0)}
                for r in p["rows"]]
        parts.append(markdown_table(rows, floatfmt=".1f"))
        if p["unavailable"]:
            parts.append("Not run here: " + "; ".join(
                f"{m['backend']} {m['precision']}{' batch ' + str(m['batch']) if 'batch' in m else ''} ({m['reason']})"
                for m in p["unavailable"]) + ".")
    e = record.get("end_to_end")
    if e and "skipped" in e:
        parts.append(f"**(b) End to end**: skipped, {e['skipped']}.")
    elif e:
        parts.append(f"**(b) End to end**, file to file, median of {e['repeats']} alternating runs after {e['warmup']} "
                     f"warm-up. Baseline: {e['baseline']['what']} (ROI {e['baseline']['roi']}, overlap "
                     f"{e['baseline']['overlap']}, {e['baseline']['precision']}). Default: {e['default']['backend']}, window "
                     f"{e['default']['window']}, preprocessing {e['default']['preprocess']}.")
        plan_names = {"whole": "one", "sliding": "sliding"}
        rows = [{"case": c["name"], "shape": "×".join(map(str, c["shape"])), "window": plan_names.get(c.get("window_plan"), "-"),
                 "baseline s": c["baseline"]["median_s"], "default s": c["default"]["median_s"], "speed-up": c["speedup"],
                 "Dice agreement": c["dice_agreement"], "voxels differing": c["differing_voxels"]} for c in e["cases"]]
        parts.append(markdown_table(rows, floatfmt=".3g"))
        parts.append(f"Speed-up: at least {e['speedup_min']:.2f}×, geometric mean {e['speedup_geomean']:.2f}×; "
                     f"the two masks agree at Dice {e['dice_agreement_min']:.4f} or more"
                     + (" (one component kept on both: the largest of the tutorial's mask, the predictor's choice of its own)." if e["default"]["lcc"] else "."))
        if stage_rows(record):
            parts.append("**Where the time goes**: median seconds per stage, the same five stages for both pipelines "
                         "(read: file to array; preprocess: to the model's grid; network; invert: back to the scan's grid, "
                         "argmax and one component kept; write: the mask file).")
            parts.append(markdown_table(stage_rows(record), floatfmt=".3g"))
        if agreement_rows(record):
            parts.append(f"**Agreement per backend and precision**: Dice of each pipeline's mask with the tutorial's fp32 "
                         f"mask, per case (target {e.get('agreement_target')} on every case), and its speed-up.")
            parts.append(markdown_table(agreement_rows(record), floatfmt=".4g"))
            if e.get("agreement_not_run"):
                parts.append("Not run here: " + "; ".join(f"{m['pipeline']} ({m['reason']})" for m in e["agreement_not_run"]) + ".")
        if process_rows(record):
            w = e["whole_process"]
            parts.append(f"**Whole processes** on `{w['image']}`, start-up included (imports, opening the model): median of "
                         f"{w['repeats']} alternating rounds after {w['warmup']}. Start-up is the process's time beyond the same "
                         "work in a warm process (the end-to-end table above).")
            parts.append(markdown_table(process_rows(record), floatfmt=".3g"))
    return "\n\n".join(parts)


#: issue 14's targets on a full-resolution CT: the default path against the tutorial's pipeline
TARGETS = {"beyond start-up": 8.0, "whole process": 3.0}


def targets_markdown(record: dict[str, Any]) -> str:
    """Whether the record meets :data:`TARGETS` and :data:`AGREEMENT_TARGET`, in sentences with
    the measured numbers (met or not: a target missed is said so)."""
    e = record.get("end_to_end", {})
    out = []
    for a in e.get("agreement", []):
        worst = min(a["dice_by_case"], key=a["dice_by_case"].get) if a["dice_by_case"] else None
        out.append(f"- Agreement, {a['pipeline']} ({a['backend']}): lowest Dice {a['dice_min']:.4f} ({worst}) "
                   f"against the target {e['agreement_target']} on every case: **{'met' if a['meets_target'] else 'not met'}**.")
    w = e.get("whole_process")
    if w:
        shape = next((c["shape"] for c in e.get("cases", []) if c["file"] == w["image"]), None)
        where = f"`{w['image']}`" + (f" ({'×'.join(map(str, shape))} voxels)" if shape else "")
        for k in [k for k in w["speedup"] if k in w.get("speedup_beyond_startup", {})]:
            b, p = w["speedup_beyond_startup"][k], w["speedup"][k]
            out.append(f"- Speed, {k} on {where}: {b:.2f}× beyond start-up (target {TARGETS['beyond start-up']:g}×: "
                       f"**{'met' if b >= TARGETS['beyond start-up'] else 'not met'}**) and {p:.2f}× as whole processes "
                       f"(target {TARGETS['whole process']:g}×: **{'met' if p >= TARGETS['whole process'] else 'not met'}**); "
                       f"start-up {w['startup_s'][k]:.1f} s against the baseline's {w['startup_s']['baseline']:.1f} s.")
        case = next((c for c in e.get("cases", []) if c["file"] == w["image"]), None)
        net = (case or {}).get("stages_s", {}).get("default", {}).get("network")
        if net and "in_process_s" in w:
            base = w["in_process_s"]["baseline"]
            out.append(f"- Where the limit lies: the default path's network stage alone (the tutorial's windows, fp32) took {net:.2f} s "
                       f"of its {w['in_process_s']['default']:.2f} s; with every other stage at zero the ratio beyond start-up "
                       f"would be {base / net:.1f}×: more needs the network itself faster, on other hardware (a GPU) or "
                       f"with a lower precision or fewer windows, which change the masks.")
    return "\n".join(out) if out else "No end-to-end measurement in this record."


def plot_benchmark(record: dict[str, Any]):
    """A matplotlib figure: per-patch latency by backend and batch, end-to-end times, time per
    stage and, when measured, whole processes split into start-up and work."""
    import matplotlib.pyplot as plt

    has_e2e = bool(record.get("end_to_end", {}).get("cases"))
    has_stages = bool(stage_rows(record))
    whole = record.get("end_to_end", {}).get("whole_process") or {}
    has_whole = bool(whole.get("startup_s"))
    n = 1 + int(has_e2e) + int(has_stages) + int(has_whole)
    cols = min(n, 2)  # two panels a row: four in one row are too small to read in a book page
    rows_ = math.ceil(n / cols)
    fig, grid = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.4 * rows_), squeeze=False)
    panels = list(grid.ravel())
    for extra in panels[n:]:
        extra.remove()
    ax = panels[0]
    rows = record.get("patch", {}).get("rows", [])
    labels = list(dict.fromkeys((r["backend"], r["precision"], r["device"]) for r in rows))  # first-seen order
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(1, len(labels))
    for i, key in enumerate(labels):
        sel = {r["batch"]: r for r in rows if (r["backend"], r["precision"], r["device"]) == key}
        xs = [j + i * width for j, b in enumerate(batches) if b in sel]
        ys = [sel[b]["ms_per_patch"] for b in batches if b in sel]
        lo = [sel[b]["ms_per_patch"] - sel[b]["p10_ms"] / b for b in batches if b in sel]
        hi = [sel[b]["p90_ms"] / b - sel[b]["ms_per_patch"] for b in batches if b in sel]
        ax.bar(xs, ys, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, label=f"{key[0]} {key[1]} ({key[2]})")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    patch = record.get("patch", {}).get("patch", [96, 96, 96])
    ax.set_ylabel("ms per patch (median, p10-p90)")
    ax.set_title(f"one {'x'.join(map(str, patch))} patch")
    ax.legend(fontsize=8)
    if has_e2e:
        ax = panels[1]
        cases = record["end_to_end"]["cases"]
        xs = np.arange(len(cases))
        b = [c["baseline"]["median_s"] for c in cases]
        d = [c["default"]["median_s"] for c in cases]
        ax.bar(xs - 0.2, b, 0.4, label="MONAI tutorial pipeline (fp32, 160^3 sliding window)")
        ax.bar(xs + 0.2, d, 0.4, label=f"spleen_utils default ({record['end_to_end']['default']['backend']})")
        for x, c, top in zip(xs, cases, b):
            ax.text(x, top, f"{c['speedup']:.1f}x faster\nDice {c['dice_agreement']:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"{c['name']}\n{'x'.join(map(str, c['shape']))}" for c in cases], fontsize=8)
        ax.set_ylabel("seconds, file to file (median)")
        ax.set_title("end to end, whole CT")
        ax.set_ylim(0, max(b) * 1.3)
        ax.legend(fontsize=8, loc="upper right")
    if has_stages:
        ax = panels[1 + int(has_e2e)]
        rows = stage_rows(record)
        ys = np.arange(len(rows))
        left = np.zeros(len(rows))
        for k in STAGES:
            v = np.array([r[k] for r in rows])
            ax.barh(ys, v, left=left, label=k)
            left += v
        ax.set_yticks(ys, [f"{r['case']}\n{r['pipeline']}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median per stage)")
        ax.set_title("where the time goes")
        ax.legend(fontsize=7, loc="lower right")
    if has_whole:
        ax = panels[n - 1]
        names = [k for k in whole["processes"] if k in whole["startup_s"]]
        ys = np.arange(len(names))
        work = np.array([whole["in_process_s"][k] for k in names])
        start = np.array([whole["processes"][k]["median_s"] for k in names]) - work
        ax.barh(ys, start, color="0.7", label="start-up (imports, opening the model)")
        ax.barh(ys, work, left=start, color="C2", label="the prediction itself")
        for y, k, total in zip(ys, names, start + work):
            note = "" if k == "baseline" else f"  {whole['speedup'][k]:.1f}x faster"
            ax.text(total, y, f" {total:.1f} s{note}", va="center", fontsize=8)
        ax.set_yticks(ys, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(start + work) * 1.45)
        ax.set_xlabel("seconds per process (median)")
        ax.set_title(f"whole processes, {whole['image'].split('.')[0]}")
        ax.legend(fontsize=7, loc="lower right")
    hw = record.get("hardware", {})
    where = hw.get("gpu") or f"{hw.get('cpu')}, {hw.get('cpu_cores')} cores"
    threads = record.get("settings", {}).get("torch_threads", hw.get("torch_threads"))
    fig.suptitle(f"spleen UNet inference on {where}, {threads} PyTorch thread(s) ({record.get('date', '')[:10]})", fontsize=10)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(_baseline_main())
