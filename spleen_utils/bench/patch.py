"""(a) Per patch: the network alone on one patch, per backend, precision and batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import SpleenError
from .measure import PeakMemory, count_flops, matmul_gflops, summarize_times, time_calls, vendor_peak_gflops

#: the patch timed in (a): the MONAI spleen recipe's training patch, as the MONAI bundle reports it
DEFAULT_PATCH = (96, 96, 96)


def _patch_runners(model_path: Path, onnx_path: Path | None, engine_path: Path | None, device: torch.device) -> tuple[list[dict], list[dict]]:
    """``([{backend, precision, device, fn}], [{backend, precision, reason}])``."""
    from ..backends import OnnxBackend, TensorRTBackend, TorchBackend
    from ..model import cpu_supports_bf16

    runners: list[dict] = []
    missing: list[dict] = []

    def add(backend: str, precision: str, make: Callable[[], Any]) -> None:
        try:
            b = make()
        except SpleenError as e:
            missing.append({"backend": backend, "precision": precision, "reason": str(e)})
            return
        from ..backends import optimize_torch_backend  # as the Predictor runs it

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
        from ..export import tensorrt_available

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
    from ..model import load_model, resolve_device

    dev = resolve_device(device)
    model, recipe, _ = load_model(model_path, "cpu")
    patch = tuple(int(v) for v in (patch or DEFAULT_PATCH))
    flops = count_flops(model, (1, 1, *patch))
    del model
    runners, missing = _patch_runners(Path(model_path), Path(onnx_path) if onnx_path else None, Path(engine_path) if engine_path else None, dev)
    from ..model import cpu_supports_bf16

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
