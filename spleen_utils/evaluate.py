"""Judging a model on cases: predict a list of scans, score them, and the component rules compared.

The notebooks, the ablation, the stress test and the benchmark all evaluate through these
functions, so a Dice in the book is computed one way wherever it comes from.

* :func:`real_cases` -- the real CT scans to judge on (shipped, validation-only, or a folder);
* :func:`predict_items` / :func:`evaluate_items` -- masks on each input's grid, then Dice, HD95, mL;
* :func:`lcc_effect` / :func:`component_rules` -- what keeping one component changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config


def real_cases(folder: str | Path | None = None, validation: bool = False) -> tuple[list[dict[str, str]], str]:
    """Real CT scans with spleen masks, and a sentence saying what was found.

    By default the scans shipped with the library (:func:`spleen_utils.samples.real_cases`,
    always there) and, with ``validation``, the ones that may be used for validation but never
    shipped (``ircad_1``, when ``$SPLEEN_REAL_DATA`` or ``../shared/data/real`` holds it). Each
    entry says where its label comes from (``label_source``: manual or model). A ``folder``
    instead lists its own ``X_image`` + ``X_label`` or ``X`` + ``X_spleen`` pairs.
    """
    from .io import case_name, is_nifti_name

    if folder is None:
        from . import samples

        cases = samples.real_cases() + (samples.validation_cases() if validation else [])
        pairs = [{"name": c.name, "image": str(c.image), "label": str(c.label), "label_source": c.label_source,
                  "shipped": str(c.image).startswith(str(samples.SAMPLES_DIR))} for c in cases]
        n_shipped = sum(p["shipped"] for p in pairs)
        why = f"{n_shipped} real CT scan(s) shipped with spleen_utils.samples"
        if validation:
            extra = [p["name"] for p in pairs if not p["shipped"]]
            why += (f", and {', '.join(extra)} (validation only, not shipped) from {samples.real_data_dir()}" if extra else
                    "; the validation-only scan ircad_1 is not here (set SPLEEN_REAL_DATA or place it in ../shared/data/real)")
        return pairs, why
    folder = Path(folder)
    if not folder.is_dir():
        return [], f"{folder} is not a folder of real CT scans"
    files = {case_name(f): f for f in sorted(folder.iterdir()) if is_nifti_name(f)}
    pairs = []
    for stem, f in files.items():
        if stem.endswith(("_label", "_spleen")):
            continue
        base = stem[: -len("_image")] if stem.endswith("_image") else stem
        label = files.get(f"{base}_label") or files.get(f"{stem}_spleen")
        if label is not None:
            pairs.append({"name": base, "image": str(f), "label": str(label)})
    if not pairs:
        return [], f"{folder} holds no image/label pair"
    return pairs, f"{len(pairs)} real CT scan(s) with spleen masks in {folder}"


def real_role(case: dict[str, Any], cfg: Config) -> str:
    """What a real scan was to a run of ``cfg``: trained on, held out, or never seen."""
    name = case.get("name")
    if name in cfg.real_train:
        return "trained on"
    if name in cfg.real_val:
        return "held out: validated, never chose the checkpoint"
    return "never trained on" + ("" if case.get("shipped", True) else ", validation only, not shipped")


def predict_items(predictor, items: Sequence[dict[str, str]], out_dir: str | Path,
                  record: str | Path | None = None) -> list[dict[str, Any]]:
    """Predict each item's image into ``out_dir/<case>.nii.gz``; the records also go to ``record`` (JSON)."""
    from .io import case_name

    out_dir = Path(out_dir)
    records = []
    for item in items:
        name = item.get("name") or case_name(item["image"])
        rec = predictor.predict_file(item["image"], out_dir / f"{name}.nii.gz")
        rec["name"] = name
        records.append(rec)
    if record is not None:
        from .provenance import write_json

        write_json(records, record)
    return records


def evaluate_items(records: Sequence[dict[str, Any]], items: Sequence[dict[str, str]],
                   json_out: str | Path | None = None) -> dict[str, Any]:
    """Dice, HD95 and volumes of predicted masks (``records`` of :func:`predict_items`) against the items' labels."""
    from .metrics import evaluate_case, summarize

    cases = []
    for rec, item in zip(records, items):
        if "label" not in item:
            continue
        case = evaluate_case(rec["output"], item["label"])
        case["name"] = rec.get("name", case["name"])
        cases.append(case)
    result = summarize(cases)
    if json_out is not None:
        from .provenance import write_json

        write_json(result, json_out)
    return result


def masks_on_grid(records: Sequence[dict[str, Any]]) -> bool:
    """Whether every written mask has exactly its input image's shape and affine."""
    from .io import load_nifti, same_grid

    return all(same_grid(load_nifti(r["output"], dtype=None), load_nifti(r["input"], dtype=None)) for r in records)


def describe_grid(shape: Sequence[int], affine: Any) -> str:
    """``"427 x 427 x 41 voxels of 0.85 x 0.85 x 4.42 mm, LPS"`` for a grid."""
    import nibabel as nib
    import numpy as np

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    dims = " x ".join(str(int(s)) for s in tuple(shape)[-3:])
    mm = " x ".join(f"{v:.3g}" for v in spacing)
    return f"{dims} voxels of {mm} mm, {''.join(nib.aff2axcodes(affine))}"


def lcc_effect(raw: Any, label: Any | None, spacing: Sequence[float]) -> tuple[Any, dict[str, Any]]:
    """Keep the largest connected component of a raw mask; returns the new mask and what changed.

    The rule is :func:`spleen_utils.postprocess.keep_one_component` without a margin: MONAI's
    ``KeepLargestConnectedComponent`` (26-connectivity; a test holds the two equal). The
    components are counted (``scipy.ndimage.label``) and, when a label is given, the Dice before
    and after.
    """
    import numpy as np
    from scipy import ndimage

    from .postprocess import keep_one_component
    from .metrics import dice, volume_ml

    raw = np.asarray(raw, dtype=np.uint8)
    kept = np.array(keep_one_component(raw), dtype=np.uint8)  # a copy: ``raw`` is never modified
    info: dict[str, Any] = {
        "components_before": int(ndimage.label(raw > 0, structure=np.ones((3, 3, 3)))[1]),
        "components_after": int(ndimage.label(kept > 0, structure=np.ones((3, 3, 3)))[1]),
        "ml_before": volume_ml(raw, spacing),
        "ml_after": volume_ml(kept, spacing),
        "voxels_removed": int(raw.sum()) - int(kept.sum()),
    }
    if label is not None:
        info["dice_before"] = dice(raw, label)
        info["dice_after"] = dice(kept, label)
        info["label_ml"] = volume_ml(np.asarray(label) > 0, spacing)
    return kept, info


def component_rules(raw_predictor, predictor, vol, label: Any) -> dict[str, Any]:
    """One scan through the two ways of keeping one component: MONAI's largest (applied to
    ``raw_predictor``'s mask, which keeps every component) and ``predictor``'s own rule
    (:func:`spleen_utils.postprocess.keep_one_component`). Dice and mL of each, and the raw mask's
    component count."""
    import numpy as np

    from .metrics import dice, volume_ml

    raw, _ = raw_predictor.predict_volume(vol)
    _, info = lcc_effect(raw, label, vol.spacing)
    kept, _ = predictor.predict_volume(vol)
    label = np.asarray(label) > 0
    return {"components": info["components_before"], "dice_raw": info["dice_before"],
            "dice_largest": info["dice_after"], "dice_kept": dice(kept, label),
            "ml_largest": info["ml_after"], "ml_kept": volume_ml(kept, vol.spacing), "label_ml": info["label_ml"]}
