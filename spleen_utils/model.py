"""The network factory and self-describing checkpoints.

A checkpoint (``best_model.pt``) is a plain dict that ``torch.load(weights_only=True)`` reads:
the weights plus everything needed to use them (network arguments, the recipe, labels, library
versions), in the spirit of a MONAI bundle's ``metadata.json``. It is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import check_checkpoint, checkpoint_contents
from .config import Recipe
from .errors import SpleenError



def build_network(recipe: Recipe) -> torch.nn.Module:
    """The MONAI residual 3D UNet of the spleen tutorial."""
    from monai.networks.nets import UNet

    return UNet(**recipe.network_kwargs())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half file.

    :func:`spleen_utils.io.atomic_path` ``fsync`` s the file before the rename and the folder after
    it, so a power cut leaves either the old file or the new one, whole.
    """
    from .io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def make_checkpoint(model: torch.nn.Module, recipe: Recipe, **extra: Any) -> dict[str, Any]:
    """The self-describing dict of :func:`spleen_utils.artifact.checkpoint_contents`, weights on the CPU."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return checkpoint_contents(state, recipe, **extra)


def save_checkpoint(model: torch.nn.Module, recipe: Recipe, path: str | Path, **extra: Any) -> Path:
    """Write a self-describing checkpoint atomically. ``extra`` adds e.g. epoch and metric."""
    return atomic_torch_save(make_checkpoint(model, recipe, **extra), path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint dict (weights only, no code execution)."""
    path = Path(path)
    if not path.exists():
        raise SpleenError(f"{path}: no such model file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise SpleenError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}).") from None
    return check_checkpoint(ckpt, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Recipe, dict[str, Any]]:
    """Network (in eval mode, on ``device``), its recipe, and the checkpoint's metadata."""
    ckpt = read_checkpoint(path)
    recipe = Recipe.from_model(ckpt["recipe"], str(path))
    model = build_network(recipe)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise SpleenError(f"{path}: weights do not match the network the checkpoint describes ({str(e).splitlines()[0]}).") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scaler")}
    return model, recipe, meta


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SpleenError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto.")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise SpleenError(f"unknown device {device!r}; use auto, cpu or cuda.")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
