"""Network backends behind one interface, so the pipeline never knows which runtime it drives.

A backend is a callable ``backend(x) -> logits``: ``x`` is a float32 ``torch.Tensor`` of shape
``(N, 1, X, Y, Z)`` (intensities already windowed to [0, 1]); it returns float32 logits
``(N, C, X, Y, Z)`` on the same device as ``x``. It also carries ``name``, ``device``,
``precision``, ``recipe`` (the :class:`~spleen_utils.config.Recipe` read from the artifact) and
``meta`` (the artifact's own description).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import Recipe
from .errors import SpleenError
from .model import cpu_supports_bf16, load_model, resolve_device


class Backend(Protocol):
    name: str
    device: torch.device
    precision: str
    recipe: Recipe
    meta: dict[str, Any]

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """PyTorch on CPU or CUDA; ``precision`` fp32, or ``amp`` (fp16 on CUDA, bf16 on CPU)."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "auto", precision: str = "fp32"):
        self.device = resolve_device(device)
        self.model, self.recipe, self.meta = load_model(model_path, self.device)
        if precision not in ("fp32", "amp", "bf16", "fp16"):
            raise SpleenError(f"unknown precision {precision!r} for the torch backend; use fp32 or amp.")
        if precision == "amp":
            precision = "fp16" if self.device.type == "cuda" else "bf16"
        if precision == "bf16" and self.device.type == "cpu" and not cpu_supports_bf16():
            precision = "fp32"  # no native bf16 here: emulating it would only be slower
        self.precision = precision

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        src = x.device
        with self.autocast():
            y = self.model(x.to(self.device, non_blocking=True))
        return y.float().to(src)


BACKENDS = ("auto", "torch", "onnx", "tensorrt")


def open_backend(model_path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "fp32") -> Backend:
    """Open ``model_path`` with the named backend (``auto``: by suffix, .pt / .onnx / .engine)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise SpleenError(f"{model_path}: no such model file.")
    if backend == "auto":
        backend = {".pt": "torch", ".pth": "torch", ".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt"}.get(
            model_path.suffix, ""
        )
        if not backend:
            raise SpleenError(f"{model_path}: cannot tell the backend from the suffix; pass --backend torch|onnx|tensorrt.")
    if backend == "torch":
        return TorchBackend(model_path, device=device, precision=precision)
    if backend in ("onnx", "tensorrt"):
        raise SpleenError(f"the {backend} backend is not available yet.")
    raise SpleenError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
