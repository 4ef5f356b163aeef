"""The baseline: the MONAI spleen tutorial's inference on one file, as the tutorial writes it.

Its preprocessing is the recipe's MONAI reference chain, declared once in
:func:`spleen_utils.transforms.load_transforms` (what training and validation use too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import Recipe
from .measure import _sync


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
    and ``EnsureChannelFirstd``; ``preprocess_s``: the rest of the chain; ``inference_s``, ``invert_s``
    (``Invertd`` and ``AsDiscreted``), ``write_s``, ``total_s``).
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged

    from ..transforms import load_transforms

    recipe = recipe or Recipe()
    device = torch.device(device)
    pre = load_transforms(recipe, keys=("image",))  # the recipe's MONAI reference chain, the tutorial's order
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



def _baseline_main(argv: Sequence[str] | None = None) -> int:
    """``python -m spleen_utils.bench baseline --model M --input CT --output-dir D``: the tutorial's
    inference as one process (what :func:`spleen_utils.bench.processes.bench_processes` times against ``spleen-seg predict``)."""
    import argparse

    from ..model import load_model

    ap = argparse.ArgumentParser(prog="python -m spleen_utils.bench", description="the MONAI spleen tutorial's inference, one file, as a process")
    ap.add_argument("what", choices=["baseline"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output-dir", required=True)
    a = ap.parse_args(argv)
    from ..model import resolve_device

    dev = resolve_device("auto")  # as the tutorial: the GPU when there is one
    model, recipe, _ = load_model(a.model, dev)
    mask, t = baseline_predict(model, a.input, a.output_dir, recipe, dev)
    print(f"{Path(a.input).name}: {int(mask.sum())} spleen voxels ({t['total_s']:.1f} s)")
    return 0
