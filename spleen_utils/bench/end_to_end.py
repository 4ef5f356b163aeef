"""(b) End to end: whole CT files, the tutorial's pipeline against the default path and its variants.

Both pipelines run file to file (load -> preprocess -> network -> back to the input grid -> write),
alternating so that both see the same machine load; the record has the speed ratio of the
medians, the time of each stage (:data:`STAGES`) and the Dice agreement of the masks.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import SpleenError
from .baseline import baseline_predict
from .measure import PeakMemory, summarize_times

#: the stages of both pipelines, in order: file -> arrays, arrays -> the model's grid, the
#: network, back to the input's grid (with the argmax / largest component), mask -> file
STAGES = ("read", "preprocess", "network", "invert", "write")
#: the agreement with the tutorial's masks the default path must reach on every case (issue 14)
AGREEMENT_TARGET = 0.99


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    from ..metrics import dice

    return dice(a, b)


def _one_component(mask: np.ndarray, lcc: bool) -> np.ndarray:
    """The tutorial's mask as it is compared with a pipeline that keeps one component (``lcc``):
    its largest component (:func:`spleen_utils.postprocess.keep_one_component`, which returns a new
    array and leaves ``mask`` as it was), else the mask itself."""
    from ..postprocess import keep_one_component

    return keep_one_component(mask) if lcc else mask


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def stage_times(t: dict[str, float]) -> dict[str, float]:
    """A pipeline's stage times (:func:`baseline_predict`'s or :meth:`Predictor.predict_file`'s
    keys) under the common names of :data:`STAGES`."""
    if "invert_s" in t:  # the baseline
        keys = ("read_s", "preprocess_s", "inference_s", "invert_s", "write_s")
    else:
        keys = ("load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s")
    return {name: float(t.get(k, float("nan"))) for name, k in zip(STAGES, keys)}


def bench_end_to_end(
    model_path: str | Path,
    images: Sequence[str | Path],
    device: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    predictor=None,
    baseline_model: torch.nn.Module | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    window: str = "auto",
    precision: str = "auto",
    variants: Sequence[tuple[str, Any]] = (),
    not_run: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Whole files, the tutorial's pipeline (:func:`baseline_predict`) against the default path.

    For each image, ``warmup`` untimed runs of each pipeline, then ``repeats`` timed runs that
    alternate baseline and default (so both see the same machine load). ``predictor`` and
    ``baseline_model`` default to ``Predictor.from_path(model_path)`` (the default path, what
    ``spleen-seg predict --model`` the checkpoint runs: torch fp32, or the checkpoint's own ONNX
    export beside it, see :func:`spleen_utils.backends.onnx_twin`; another ``window`` or
    ``precision`` measures that choice instead) and the checkpoint's fp32 network.

    ``variants``: more ``(label, Predictor)`` pairs (another backend or precision), run in the
    same alternation; every pipeline's mask is compared with the tutorial's, and the record's
    ``agreement`` table has one row per backend and precision (``not_run``: rows that could not
    run here, with their reason).
    """
    from ..infer import Predictor
    from ..model import load_model, resolve_device

    dev = resolve_device(device)
    if baseline_model is None:
        baseline_model, recipe, _ = load_model(model_path, dev)
    if predictor is None:
        predictor = Predictor.from_path(model_path, device=str(dev), precision=precision, window=window)
    recipe = predictor.recipe
    say = progress or (lambda s: None)
    cases = []
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="spleen-bench-"))
        for image in images:
            run = _time_case(Path(image), Path(out_dir), predictor, baseline_model, recipe, dev, repeats, warmup, variants, say)
            cases.append(_case_record(run, predictor, recipe))
    ratios = [c["speedup"] for c in cases if c["speedup"]]
    return {
        "baseline": {
            "what": "MONAI spleen tutorial inference: LoadImaged, EnsureChannelFirstd, ScaleIntensityRanged, CropForegroundd, "
            "Orientationd, Spacingd; fp32 sliding_window_inference; Invertd (2 channels, bilinear); AsDiscreted(argmax); SaveImaged",
            "roi": list(recipe.sw_roi),
            "overlap": recipe.overlap,
            "sw_batch_size": recipe.sw_batch_size,
            "precision": "fp32",
            "device": str(dev),
        },
        "default": {
            "what": "spleen_utils.infer.Predictor defaults (see its module docstring)",
            "backend": predictor.description,
            "window": predictor.window,
            "max_window_voxels": predictor.max_window_voxels,
            "preprocess": predictor.preprocess,
            "lcc": predictor.lcc,
        },
        "repeats": repeats,
        "warmup": warmup,
        "cases": cases,
        "stages": list(STAGES),
        # one row per backend and precision: its masks against the tutorial's fp32 masks
        "agreement": _agreement(cases, predictor, variants),
        "agreement_target": AGREEMENT_TARGET,
        "agreement_not_run": list(not_run),
        "speedup_min": min(ratios) if ratios else None,
        "speedup_geomean": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,
        "dice_agreement_min": min(c["dice_agreement"] for c in cases) if cases else None,
    }


def _time_case(image: Path, out_dir: Path, predictor, baseline_model, recipe, dev: torch.device, repeats: int, warmup: int,
               variants: Sequence[tuple[str, Any]], say: Callable[[str], None]) -> dict[str, Any]:
    """One image through every pipeline: ``warmup`` untimed rounds, then ``repeats`` timed ones
    that alternate baseline, default and each variant. Returns the raw times, memory and files."""
    from ..io import load_nifti

    if not image.exists():
        raise SpleenError(f"{image}: no such image to benchmark.")
    vol = load_nifti(image)
    name = image.name.split(".")[0]
    base_dir, ours = out_dir / "baseline", out_dir / f"{name}_default.nii.gz"

    def run_baseline():
        return baseline_predict(baseline_model, image, base_dir, recipe, dev)

    def run_default():
        rec = predictor.predict_file(image, ours)
        return rec["timings"]

    extra = [(label, p, out_dir / f"{name}_v{j}.nii.gz") for j, (label, p) in enumerate(variants)]
    for _ in range(warmup):
        run_baseline()
        run_default()
        for _, p, path in extra:
            p.predict_file(image, path)
    base_stages, our_stages, base_mem, our_mem = [], [], [], []
    extra_times: list[list[dict[str, float]]] = [[] for _ in extra]
    for i in range(repeats):
        say(f"{image.name}: repeat {i + 1}/{repeats}, baseline")
        with PeakMemory(cuda=dev.type == "cuda") as m:
            base_mask, st = run_baseline()
        base_stages.append(st)
        base_mem.append(m.record())
        say(f"{image.name}: repeat {i + 1}/{repeats}, default path")
        with PeakMemory(cuda=dev.type == "cuda") as m:
            st = run_default()
        our_stages.append(st)
        our_mem.append(m.record())
        for (label, p, path), times in zip(extra, extra_times):
            say(f"{image.name}: repeat {i + 1}/{repeats}, {label}")
            times.append(p.predict_file(image, path)["timings"])
    if repeats == 0:
        base_mask, _ = run_baseline()
        run_default()
        for (_, p, path), times in zip(extra, extra_times):
            times.append(p.predict_file(image, path)["timings"])
    return {"image": image, "vol": vol, "name": name, "ours": ours, "base_mask": base_mask, "extra": extra, "extra_times": extra_times,
            "base_stages": base_stages, "our_stages": our_stages, "base_mem": base_mem, "our_mem": our_mem}


def _variant_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each variant's median time, stages and agreement with the tutorial's mask on one case."""
    from ..io import load_nifti

    base_mask, others = run["base_mask"], []
    for (label, p, path), times in zip(run["extra"], run["extra_times"]):
        m_ = load_nifti(path, what="mask", dtype=None).array.astype(np.uint8)
        r_ = _one_component(base_mask, p.lcc)
        t_ = summarize_times([t["total_s"] for t in times])
        others.append({"label": label, "backend": p.description, "median_s": t_["median_s"], "n": t_["n"],
                       "stages_s": _median_stages([stage_times(t) for t in times]),
                       "dice_agreement": _dice(r_, m_), "differing_voxels": int((r_ != m_).sum()), "spleen_voxels": int(m_.sum())})
    return others


def _preprocessed_shape(vol, recipe) -> list[int] | None:
    """The shape of ``vol`` on the model's grid (the default path's preprocessing), or None."""
    try:
        from ..preprocess import prepare

        p = prepare(vol, recipe)
        return list(p.image.shape) if p is not None and not isinstance(p, str) else None
    except Exception:  # geometry is informative only
        return None


def _case_record(run: dict[str, Any], predictor, recipe) -> dict[str, Any]:
    """One case of the record from :func:`_time_case`'s raw measurements."""
    from ..io import load_nifti

    vol, base_mask = run["vol"], run["base_mask"]
    base_stages, our_stages = run["base_stages"], run["our_stages"]
    our_mask = load_nifti(run["ours"], what="mask", dtype=None).array.astype(np.uint8)
    ref = _one_component(base_mask, predictor.lcc)
    bs = summarize_times([t["total_s"] for t in base_stages] or [float("nan")])
    os_ = summarize_times([t["total_s"] for t in our_stages] or [float("nan")])
    prep = _preprocessed_shape(vol, recipe)
    return {
        "name": run["name"],
        "load_average_1min": _load_average(),
        "file": run["image"].name,
        "shape": list(vol.shape),
        "spacing_mm": [round(s, 4) for s in vol.spacing],
        "orientation": vol.axcodes,
        "preprocessed_shape": prep,
        "window_plan": predictor.window_plan(tuple(prep)) if prep else None,
        "baseline": {**bs, "stages_median_s": _median_stages(base_stages), "memory": _max_memory(run["base_mem"]), "spleen_voxels": int(base_mask.sum())},
        "default": {**os_, "stages_median_s": _median_stages(our_stages), "memory": _max_memory(run["our_mem"]), "spleen_voxels": int(our_mask.sum())},
        # the same five stages for both pipelines (medians, seconds): STAGES
        "stages_s": {"baseline": _median_stages([stage_times(t) for t in base_stages]),
                     "default": _median_stages([stage_times(t) for t in our_stages])},
        "variants": _variant_rows(run),
        "speedup": bs["median_s"] / os_["median_s"] if os_["median_s"] > 0 else None,
        # one component kept on both sides (the tutorial has no connected-component filter; the
        # default path keeps one: postprocess.keep_one_component, the largest unless a comparable rival
        # is surer): what differs is the pipeline
        "dice_agreement": _dice(ref, our_mask),
        # against the tutorial's own output, post-processing difference included
        "dice_agreement_raw": _dice(base_mask, our_mask),
        "differing_voxels": int((ref != our_mask).sum()),
    }


def _agreement(cases: list[dict[str, Any]], predictor, variants: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    """One row per pipeline (the default, then each variant): its Dice with the tutorial's masks
    and its speed-up on each case, the lowest Dice and whether it meets :data:`AGREEMENT_TARGET`."""
    agreement = [{"pipeline": "default", "backend": predictor.description, "default": True,
                  "dice_by_case": {c["name"]: c["dice_agreement"] for c in cases},
                  "speedup_by_case": {c["name"]: c["speedup"] for c in cases}}]
    for j, (label, p) in enumerate(variants):
        agreement.append({"pipeline": label, "backend": p.description, "default": False,
                          "dice_by_case": {c["name"]: c["variants"][j]["dice_agreement"] for c in cases},
                          "speedup_by_case": {c["name"]: c["baseline"]["median_s"] / c["variants"][j]["median_s"] for c in cases}})
    for row in agreement:
        row["dice_min"] = min(row["dice_by_case"].values()) if cases else None
        row["meets_target"] = bool(cases) and row["dice_min"] >= AGREEMENT_TARGET
    return agreement


def _median_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    if not stages:
        return {}
    return {k: float(np.median([s[k] for s in stages])) for k in stages[0]}


def _max_memory(records: list[dict]) -> dict[str, float]:
    if not records:
        return {}
    return {k: max(r[k] for r in records if r.get(k) is not None) for k in records[0] if any(r.get(k) is not None for r in records)}


def _end_to_end_variants(model_path, onnx_path, dev: torch.device, window: str, torch_fp32: bool = False) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """The other backends and precisions timed end to end beside the default: torch fp32 when
    ``torch_fp32`` (the default runs the checkpoint's ONNX export), else ONNX Runtime fp32 when
    there is an ONNX file; torch bf16 autocast where the CPU runs it natively (fp16 on CUDA).
    The rest is listed with the reason it did not run."""
    from ..infer import Predictor
    from ..model import cpu_supports_bf16

    variants: list[tuple[str, Any]] = []
    not_run: list[dict[str, str]] = []
    if torch_fp32:
        variants.append(("torch fp32", Predictor.from_path(model_path, backend="torch", device=str(dev), precision="fp32", window=window)))
    elif onnx_path is not None:
        variants.append(("onnx fp32", Predictor.from_path(onnx_path, backend="onnx", device="cpu" if dev.type == "cpu" else "auto", window=window)))
    else:
        not_run.append({"pipeline": "onnx fp32", "reason": "no ONNX file"})
    if dev.type == "cuda":
        variants.append(("torch fp16", Predictor.from_path(model_path, backend="torch", device=str(dev), precision="fp16", window=window)))
        not_run.append({"pipeline": "torch bf16", "reason": "not measured on CUDA (fp16 is CUDA's half precision here)"})
    elif cpu_supports_bf16():
        variants.append(("torch bf16", Predictor.from_path(model_path, backend="torch", device="cpu", precision="bf16", window=window)))
    else:
        not_run.append({"pipeline": "torch bf16", "reason": "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated, it would take minutes per volume"})
    return variants, not_run
