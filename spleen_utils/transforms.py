"""The one preprocessing spec of the spleen recipe, and its MONAI transform chains.

Order follows the MONAI spleen tutorial: window the HU range to [0, 1], crop to the body, orient
to RAS, resample to the recipe's spacing. Every spatial step is invertible, so predictions go
back to each input's own grid with :class:`monai.transforms.Invertd`.

The spec has two executors that compute the same array: the MONAI reference chain declared here
(:func:`load_transforms`, :func:`inference_transforms`; training, validation, the ``monai``
preprocessing of the predictor and the benchmark's tutorial baseline all use it) and the fast
array path :func:`spleen_utils.preprocess.prepare` (the default path). ``tests/test_infer.py``
(``test_preprocessing_equals_monai_transforms``) holds the two equal. The C++ program
(``cpp/src/pipeline.hpp``) mirrors the same steps and reads the same recipe fields
(:data:`PREPROCESSING_FIELDS`, :data:`WINDOW_FIELDS`) from an ONNX file's ``recipe`` metadata;
``tests/test_transforms.py`` checks that correspondence.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from .appearance import paint
from .config import Recipe

#: the recipe fields the preprocessing reads: HU window, axis codes, voxel size (mm)
PREPROCESSING_FIELDS = ("hu_window", "orientation", "pixdim")
#: the recipe fields the sliding-window inference reads: window size, windows per run, overlap
WINDOW_FIELDS = ("sw_roi", "sw_batch_size", "overlap")


def _deterministic(recipe: Recipe, keys: list[str], allow_missing: bool = False) -> list:
    """The spec's steps (:data:`PREPROCESSING_FIELDS`): window, crop, orient, resample."""
    a_min, a_max = recipe.hu_window
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True, allow_missing_keys=allow_missing),
        Orientationd(keys=keys, axcodes=recipe.orientation, labels=None, allow_missing_keys=allow_missing),
        Spacingd(keys=keys, pixdim=recipe.pixdim, mode=modes, allow_missing_keys=allow_missing),
    ]


def load_transforms(recipe: Recipe, keys: tuple[str, ...] = ("image", "label"), allow_missing: bool = False) -> Compose:
    """Files -> windowed, cropped, RAS, resampled tensors (the cacheable part).

    ``allow_missing``: keys an item may lack (a real scan has no ``tissue`` map).
    """
    keys = list(keys)
    return Compose(
        [LoadImaged(keys=keys, image_only=False, allow_missing_keys=allow_missing),
         EnsureChannelFirstd(keys=keys, allow_missing_keys=allow_missing)]
        + _deterministic(recipe, keys, allow_missing)
        + [EnsureTyped(keys=keys, track_meta=True, allow_missing_keys=allow_missing)]
    )


class RandCTAppearanced(Randomizable, MapTransform):
    """Repaint a training crop from its tissue map with a random CT appearance.

    With probability ``prob`` the image (windowed to [0, 1] by ``hu_window``) is replaced by
    :func:`spleen_utils.appearance.paint` of the crop's tissue map on the recipe's grid,
    windowed the same way. The tissue map is then dropped from the item (it is not an input of
    the network); items without one (real scans) pass through unchanged.
    """

    def __init__(self, hu_window: tuple[float, float], spacing: tuple[float, float, float], prob: float = 0.8,
                 wild: float = 0.25, image_key: str = "image", tissue_key: str = "tissue"):
        MapTransform.__init__(self, keys=[tissue_key], allow_missing_keys=True)
        self.lo, self.hi = (float(v) for v in hu_window)
        self.spacing = tuple(float(s) for s in spacing)
        self.prob, self.wild = float(prob), float(wild)
        self.image_key, self.tissue_key = image_key, tissue_key

    def randomize(self, data: Any = None) -> None:
        self._paint = self.R.uniform() < self.prob
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        tissue = d.pop(self.tissue_key, None)
        for suffix in ("_meta_dict", "_transforms"):
            d.pop(f"{self.tissue_key}{suffix}", None)
        self.randomize()
        if tissue is None or not self._paint:
            return d
        t = tissue.as_tensor() if hasattr(tissue, "as_tensor") else tissue
        hu = paint(np.asarray(t[0]), self.spacing, np.random.default_rng(self._seed), wild=self.wild)
        windowed = np.clip((hu - self.lo) / (self.hi - self.lo), 0.0, 1.0)[None].astype(np.float32)
        image = d[self.image_key]
        new = image.new_tensor(windowed) if hasattr(image, "new_tensor") else windowed
        if hasattr(image, "meta"):  # keep the MetaTensor's metadata
            image = image.clone()
            image.array = new.as_tensor() if hasattr(new, "as_tensor") else new
            new = image
        d[self.image_key] = new
        return d


def augmentations(recipe: Recipe, appearance_prob: float, wild: float) -> list:
    """Training-time randomisation: appearance from tissue maps, intensity and a small affine.

    Left and right are never flipped: the spleen is on the patient's left in every real body.
    """
    out: list = []
    if appearance_prob > 0:
        out.append(RandCTAppearanced(recipe.hu_window, recipe.pixdim, prob=appearance_prob, wild=wild))
        # cheap intensity changes for every crop, real ones included (a spatial RandAffined was
        # measured at ~170 ms per 64^3 crop on this CPU, more than the network's step: the
        # generated cases are deformed once when written instead)
        out += [
            RandScaleIntensityd(keys="image", factors=0.15, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.2),
            RandGaussianNoised(keys="image", std=0.04, prob=0.2),
        ]
    else:
        out.append(DeleteItemsd(keys=["tissue", "tissue_meta_dict"]))
    return out


def train_transforms(recipe: Recipe, appearance_prob: float = 0.0, wild: float = 0.25) -> Compose:
    """:func:`load_transforms` + padding to one patch + balanced random crops (+ randomisation).

    Items may carry a ``tissue`` map (generated cases): it is cropped with the image and, when
    ``appearance_prob`` > 0, repaints the crop with a random appearance (:class:`RandCTAppearanced`).
    """
    keys = ["image", "label", "tissue"]
    return Compose(
        list(load_transforms(recipe, tuple(keys), allow_missing=True).transforms)
        + [
            SpatialPadd(keys=keys, spatial_size=recipe.patch_size, allow_missing_keys=True),
            # foreground/background voxel lists computed once and cached, not at every crop
            FgBgToIndicesd(keys="label", image_key="image", image_threshold=0),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=recipe.patch_size,
                pos=recipe.pos,
                neg=recipe.neg,
                num_samples=recipe.num_samples,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
                allow_missing_keys=True,
            ),
            DeleteItemsd(keys=["label_fg_indices", "label_bg_indices"]),
        ]
        + augmentations(recipe, appearance_prob, wild)
    )


def val_transforms(recipe: Recipe) -> Compose:
    return load_transforms(recipe)


def inference_transforms(recipe: Recipe) -> Compose:
    """For an already-loaded channel-first ``MetaTensor`` under the key ``image`` (no label)."""
    return Compose(_deterministic(recipe, ["image"]))
