"""The MONAI transform chains of the spleen recipe: training, validation and inference.

Order follows the MONAI spleen tutorial: window the HU range to [0, 1], crop to the body, orient
to RAS, resample to the recipe's spacing. Every spatial step is invertible, so predictions go
back to each input's own grid with :class:`monai.transforms.Invertd`.
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
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

from .config import Recipe


def _deterministic(recipe: Recipe, keys: list[str]) -> list:
    a_min, a_max = recipe.hu_window
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        Orientationd(keys=keys, axcodes=recipe.orientation, labels=None),
        Spacingd(keys=keys, pixdim=recipe.pixdim, mode=modes),
    ]


def load_transforms(recipe: Recipe, keys: tuple[str, ...] = ("image", "label")) -> Compose:
    """Files -> windowed, cropped, RAS, resampled tensors (the cacheable part)."""
    keys = list(keys)
    return Compose(
        [LoadImaged(keys=keys, image_only=False), EnsureChannelFirstd(keys=keys)]
        + _deterministic(recipe, keys)
        + [EnsureTyped(keys=keys, track_meta=True)]
    )


def train_transforms(recipe: Recipe) -> Compose:
    """:func:`load_transforms` + padding to one patch + balanced random 96^3 crops."""
    keys = ["image", "label"]
    return Compose(
        list(load_transforms(recipe).transforms)
        + [
            SpatialPadd(keys=keys, spatial_size=recipe.patch_size),
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
            ),
            DeleteItemsd(keys=["label_fg_indices", "label_bg_indices"]),
        ]
    )


def val_transforms(recipe: Recipe) -> Compose:
    return load_transforms(recipe)


def inference_transforms(recipe: Recipe) -> Compose:
    """For an already-loaded channel-first ``MetaTensor`` under the key ``image`` (no label)."""
    return Compose(_deterministic(recipe, ["image"]))
