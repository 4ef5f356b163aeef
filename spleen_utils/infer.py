"""One :class:`Predictor` for every backend: preprocess, sliding window, back to the input's grid.

The mask a predictor writes has exactly the shape and affine of the image it was given, whatever
that image's orientation, spacing or voxel type: the preprocessing (crop, orientation, spacing)
is undone with MONAI's :class:`~monai.transforms.Invertd`.

For the two-label recipe, the inversion resamples one channel, the logit margin
``spleen - background``, instead of both logits: resampling is linear, so the sign of the
resampled margin is exactly the argmax of the resampled logits, at half the cost.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd, KeepLargestConnectedComponent

from .backends import Backend, open_backend
from .errors import DataError
from .io import Volume, case_name, is_nifti_name, load_nifti, save_mask
from .transforms import inference_transforms


class Predictor:
    """Segment CT volumes with any backend (see :mod:`spleen_utils.backends`)."""

    def __init__(
        self,
        backend: Backend,
        lcc: bool = True,
        roi: tuple[int, int, int] | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        progress: bool = False,
    ):
        self.backend = backend
        self.recipe = backend.recipe
        self.lcc = lcc
        self.roi = tuple(roi or self.recipe.sw_roi)
        self.sw_batch_size = int(sw_batch_size or self.recipe.sw_batch_size)
        self.overlap = float(self.recipe.overlap if overlap is None else overlap)
        self.progress = progress
        self.pre = inference_transforms(self.recipe)
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False, to_tensor=True)

    @classmethod
    def from_path(
        cls, model_path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "fp32", **kwargs: Any
    ) -> "Predictor":
        return cls(open_backend(model_path, backend=backend, device=device, precision=precision), **kwargs)

    @property
    def description(self) -> str:
        b = self.backend
        return f"{b.name} ({b.precision}, {b.device})"

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits ``(C, X, Y, Z)`` of a preprocessed ``(1, X, Y, Z)`` image."""
        with torch.no_grad():
            out = sliding_window_inference(
                image[None],
                roi_size=self.roi,
                sw_batch_size=self.sw_batch_size,
                predictor=self.backend,
                overlap=self.overlap,
                mode="constant",
                sw_device=self.backend.device,
                device="cpu",
                progress=self.progress,
            )
        return out[0]

    def predict_volume(self, vol: Volume) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 label map on ``vol``'s grid, and the time of each stage in seconds."""
        t = {}
        t0 = time.perf_counter()
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None], affine=torch.as_tensor(vol.affine))
        data = self.pre({"image": image})
        t["preprocess_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits = self.logits(data["image"])
        t["inference_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if logits.shape[0] == 2:
            pred = logits[1:2] - logits[0:1]  # the margin: > 0 where spleen wins
        else:
            pred = logits
        data["pred"] = MetaTensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred, meta=data["image"].meta)
        inverted = self.invert(data)["pred"]
        if inverted.shape[0] == 1:
            label = (inverted > 0).to(torch.uint8)
        else:
            label = inverted.argmax(dim=0, keepdim=True).to(torch.uint8)
        if self.lcc:
            label = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)(label)
        mask = np.asarray(label[0].cpu().numpy() if isinstance(label, torch.Tensor) else label[0], dtype=np.uint8)
        t["postprocess_s"] = time.perf_counter() - t0
        if mask.shape != vol.shape:  # a bug, never the user's fault
            raise RuntimeError(f"inverted mask {mask.shape} does not match the input grid {vol.shape}")
        return mask, t

    def predict_file(self, input_path: str | Path, output_path: str | Path) -> dict[str, Any]:
        """Segment one NIfTI file and write its mask; returns a record of what was done."""
        t0 = time.perf_counter()
        vol = load_nifti(input_path)
        t_load = time.perf_counter() - t0
        mask, t = self.predict_volume(vol)
        t1 = time.perf_counter()
        save_mask(mask, vol, output_path)
        t["write_s"] = time.perf_counter() - t1
        t["load_s"] = t_load
        t["total_s"] = time.perf_counter() - t0
        return {
            "input": str(input_path),
            "output": str(output_path),
            "shape": list(vol.shape),
            "spacing_mm": [round(s, 4) for s in vol.spacing],
            "orientation": vol.axcodes,
            "spleen_voxels": int(mask.sum()),
            "spleen_ml": float(mask.sum()) * vol.voxel_ml,
            "backend": self.description,
            "timings": t,
        }

    def predict_path(self, input: str | Path, output: str | Path, on_case=None) -> list[dict[str, Any]]:
        """A file to a file, or every NIfTI of a folder into a folder (same file names)."""
        input, output = Path(input), Path(output)
        if not input.exists():
            raise DataError(f"{input}: no such file or folder.")
        if input.is_file():
            if output.is_dir() or not is_nifti_name(output):
                output = output / f"{case_name(input)}.nii.gz"
            jobs = [(input, output)]
        else:
            files = sorted(f for f in input.iterdir() if is_nifti_name(f) and not f.name.startswith("."))
            if not files:
                raise DataError(f"{input}: holds no .nii or .nii.gz file.")
            if output.exists() and not output.is_dir():
                raise DataError(f"{output}: is a file; give a folder for a folder of inputs.")
            jobs = [(f, output / f"{case_name(f)}.nii.gz") for f in files]
        records = []
        for src, dst in jobs:
            rec = self.predict_file(src, dst)
            records.append(rec)
            if on_case is not None:
                on_case(rec)
        return records
