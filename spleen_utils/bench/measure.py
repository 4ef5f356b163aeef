"""Measuring: peak memory, timed calls and their summary, FLOPs and the device's peak."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

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
