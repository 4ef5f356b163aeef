"""Where and when a result was made: library versions, hardware, time, git revision, JSON records.

Every record the project writes (a checkpoint, an ONNX file's metadata, ``run.json``, the benchmark,
the service's ``/health``, the stress and ablation records) takes these facts from here, and every
JSON record is written by :func:`write_json` (atomically, numpy scalars as numbers).

Nothing heavy is imported at module level: the service and ``spleen-seg --help`` import this
module without torch.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import PROJECT_ROOT

#: the libraries a checkpoint records (what it was trained with)
CORE_LIBRARIES = ("spleen_utils", "python", "torch", "monai", "numpy", "nibabel")
#: an ONNX file adds its exporter's libraries
EXPORT_LIBRARIES = CORE_LIBRARIES + ("onnx", "onnxruntime", "onnxscript")
#: the service reports what it serves with (torch and MONAI only when installed)
SERVICE_LIBRARIES = ("python", "onnxruntime", "torch", "monai", "numpy", "nibabel", "fastapi", "starlette", "uvicorn",
                     "python-multipart")
#: the pinned libraries the tutorial depends on (notebook 00's table)
TUTORIAL_LIBRARIES = ("spleen-utils", "torch", "monai", "numpy", "nibabel", "scikit-image", "onnx", "onnxruntime",
                      "matplotlib")


def versions(names: Sequence[str] = CORE_LIBRARIES, missing: str | None = None) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names; ``python`` and ``spleen_utils`` too).

    A library that is not installed is left out, or recorded as ``missing`` when that is given.
    Versions are read from the installed metadata, so nothing is imported.
    """
    from importlib import metadata

    from . import __version__

    out: dict[str, str] = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
        elif name == "spleen_utils":
            out[name] = __version__
        else:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                if missing is not None:
                    out[name] = missing
    return out


def utc_now() -> str:
    """The time now, UTC, to the second (ISO 8601)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """The project's commit (``+dirty`` when tracked files differ from it), or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpuinfo() -> tuple[str | None, set[str]]:
    """The CPU's model name and its flags, from ``/proc/cpuinfo`` (Linux); None and no flags elsewhere."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def hardware(device: Any = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, native bf16, memory, load, OS and the GPU (if any) ``device`` runs on."""
    import psutil
    import torch

    from .model import cpu_supports_bf16

    device = torch.device(device)
    _, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
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


def environment_report() -> dict[str, Any]:
    """What this machine offers the tutorial: Python, CPU, memory, PyTorch/CUDA/cuDNN, ONNX Runtime, TensorRT."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        info["memory_gib"] = None
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:
        info["onnxruntime"] = f"not importable ({type(e).__name__})"
        info["onnxruntime_providers"] = []
    try:
        from .backends import available_backends

        info["backends"] = available_backends()
    except Exception as e:  # the deployment modules may be absent in a trimmed install
        info["backends"] = {"torch": "available", "error": f"{type(e).__name__}: {e}"}
    return info


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(record: Any) -> str:
    """``record`` as the project's JSON text: indented, numpy scalars and paths as plain values."""
    return json.dumps(record, indent=2, default=_json_default) + "\n"


def write_json(record: Any, path: str | Path) -> Path:
    """Write ``record`` to ``path`` atomically (a crash leaves the old file or the new one, whole)."""
    from .io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(record))
    return path


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a record not written yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
