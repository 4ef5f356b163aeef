"""Do the backends agree? Dice against the labels and between backends, case by case.

``spleen-seg compare-backends`` (and notebook 07) call :func:`compare_backends`. Every available
backend (torch fp32; torch mixed precision: bf16 autocast on a CPU with native bf16, fp16
autocast on CUDA; ONNX Runtime fp32; TensorRT when an engine and TensorRT are here) segments the
same held-out cases through the same :class:`~spleen_utils.infer.Predictor` pipeline; only the
runtime differs. Backends that cannot run here are listed with the reason.

Cases: the validation split of an MSD-layout dataset (``data.load_datalist`` +
``data.split_datalist`` with the profile's ``val_cases``: the cases training never saw) and the
real CT fixtures with their spleen masks (see ``tests/conftest.py``). For each case: the Dice of
every backend against the label, and the pairwise Dice *agreement* of the backends' masks. The
target: torch fp32 and ONNX Runtime fp32 agree at Dice >= :data:`AGREEMENT_TARGET` on every case.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import SpleenError

COMPARE_FORMAT = "spleen_utils.compare/1"
AGREEMENT_TARGET = 0.999
#: the real fixtures: image file -> its spleen mask
REAL_PAIRS = {
    "msd_spleen_8_image.nii.gz": "msd_spleen_8_label.nii.gz",
    "totalseg_ct_3mm.nii.gz": "totalseg_ct_3mm_spleen.nii.gz",
}


def real_cases(real_dir: str | Path) -> list[dict[str, str]]:
    """``[{"name", "image", "label", "source": "real"}]`` for the fixtures present in ``real_dir``."""
    real_dir = Path(real_dir)
    if not real_dir.is_dir():
        raise SpleenError(f"{real_dir}: no such folder of real CT fixtures.")
    out = []
    for image, label in REAL_PAIRS.items():
        if (real_dir / image).exists() and (real_dir / label).exists():
            out.append({"name": image.split(".")[0], "image": str(real_dir / image), "label": str(real_dir / label), "source": "real"})
    return out


def validation_cases(data_dir: str | Path, val_cases: int) -> list[dict[str, str]]:
    """The held-out cases of an MSD-layout dataset: the last ``val_cases`` of the sorted list."""
    from .data import load_datalist, split_datalist
    from .io import case_name

    _, val = split_datalist(load_datalist(data_dir), val_cases)
    return [{"name": case_name(c["image"]), "image": c["image"], "label": c["label"], "source": "validation"} for c in val]


def backend_specs(model_path: Path, onnx_path: Path | None, engine_path: Path | None, device: str) -> tuple[list[dict], list[dict]]:
    """``([{key, backend, precision, path}], [{key, reason}])``: what can run here, and what cannot."""
    from .export import tensorrt_available
    from .model import cpu_supports_bf16, resolve_device

    dev = resolve_device(device)
    specs = [{"key": "torch-fp32", "backend": "torch", "precision": "fp32", "path": model_path}]
    missing = []
    if dev.type == "cuda":
        specs.append({"key": "torch-fp16", "backend": "torch", "precision": "fp16", "path": model_path})
    elif cpu_supports_bf16():
        specs.append({"key": "torch-bf16", "backend": "torch", "precision": "bf16", "path": model_path})
    else:
        missing.append({"key": "torch-bf16", "reason": "this CPU has no native bf16 (AVX512-BF16 or AMX)"})
    if onnx_path is not None:
        specs.append({"key": "onnx-fp32", "backend": "onnx", "precision": "fp32", "path": onnx_path})
    else:
        missing.append({"key": "onnx-fp32", "reason": "no ONNX file given"})
    ok, reason = tensorrt_available()
    if not ok:
        missing.append({"key": "tensorrt", "reason": reason})
    elif engine_path is None:
        missing.append({"key": "tensorrt", "reason": "no TensorRT engine given (--engine; build one with spleen-seg build-trt)"})
    else:
        specs.append({"key": "tensorrt", "backend": "tensorrt", "precision": "engine", "path": engine_path})
    return specs, missing


def _open(spec: dict, device: str, **predictor_kw):
    from .infer import Predictor

    return Predictor.from_path(spec["path"], backend=spec["backend"], device=device, precision=spec["precision"], **predictor_kw)


def compare_backends(
    model_path: str | Path,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    data_dir: str | Path | None | bool = None,
    real_dir: str | Path | None | bool = None,
    device: str = "auto",
    profile: str = "quick",
    val_cases: int | None = None,
    window: str = "auto",
    lcc: bool = True,
    export_onnx_if_missing: bool = True,
    json_out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment the held-out and real cases with every available backend; Dice and agreement.

    ``data_dir``: an MSD-layout dataset (default: the profile's, when it exists; ``False``: none); its last
    ``val_cases`` (default: the profile's) are used. ``real_dir``: the real CT fixtures (default:
    where the tests find them, when present; ``False``: none). Without ``onnx_path`` the checkpoint is exported to
    a temporary ONNX file (validated) so that ONNX Runtime is compared too. Returns the record
    (:data:`COMPARE_FORMAT`) and writes it to ``json_out`` when given.
    """
    from .backends import file_sha256
    from .config import get_config
    from .model import read_checkpoint, resolve_device
    from .provenance import EXPORT_LIBRARIES, hardware, utc_now, versions, write_json

    say = progress or (lambda s: None)
    model_path = Path(model_path)
    ckpt = read_checkpoint(model_path)  # a clear error for a missing or foreign file
    cfg = get_config(profile)
    dev = resolve_device(device)
    cases, notes, data_dir = _gather_cases(cfg, data_dir, real_dir, val_cases)

    with contextlib.ExitStack() as stack:
        onnx_note = None
        if onnx_path is None and export_onnx_if_missing:
            from .export import export_onnx
            from .runs import ONNX_MODEL

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spleen-compare-")))
            onnx_path = tmp / ONNX_MODEL
            say("exporting the checkpoint to ONNX")
            rep = export_onnx(model_path, onnx_path)
            onnx_note = f"exported from the checkpoint for this comparison (max |ORT - torch| {max(rep['max_abs_diff'].values()):.2g})"
        specs, missing = backend_specs(model_path, Path(onnx_path) if onnx_path else None, Path(engine_path) if engine_path else None, str(dev))
        predictors = {}
        for spec in specs:
            try:
                predictors[spec["key"]] = _open(spec, str(dev), window=window, lcc=lcc)
            except SpleenError as e:
                missing.append({"key": spec["key"], "reason": str(e)})
        keys = list(predictors)
        pairs = list(itertools.combinations(keys, 2))
        rows = [_compare_case(case, predictors, pairs, say) for case in cases]
        descriptions = {k: p.description for k, p in predictors.items()}

    record = {
        "format": COMPARE_FORMAT,
        "date": utc_now(),
        "device": str(dev),
        "hardware": hardware(dev),
        "versions": versions(EXPORT_LIBRARIES),
        "model": {"path": str(model_path), "sha256": file_sha256(model_path), "epoch": ckpt.get("epoch"), "onnx": onnx_note or (str(onnx_path) if onnx_path else None)},
        "settings": {"window": window, "lcc": lcc, "profile": profile, "data": str(data_dir) if data_dir else None, "real": str(real_dir) if real_dir else None},
        "backends": descriptions,
        "unavailable": missing,
        "notes": notes,
        "cases": rows,
        "summary": _summary(rows, keys, pairs),
    }
    if json_out is not None:
        write_json(record, json_out)
    return record


def _gather_cases(cfg, data_dir, real_dir, val_cases: int | None) -> tuple[list[dict[str, str]], list[str], Any]:
    """``(cases, notes, data_dir)``: the held-out cases of the dataset (the profile's when
    ``data_dir`` is None and it exists; none when False) and the real scans (the shipped ones
    when ``real_dir`` is None; none when False); ``data_dir`` as used."""
    cases: list[dict[str, str]] = []
    notes: list[str] = []
    if data_dir is False:
        data_dir = None
    elif data_dir is None:
        if (cfg.dataset_dir / "dataset.json").exists():
            data_dir = cfg.dataset_dir
        else:
            notes.append(f"no dataset: {cfg.dataset_dir} does not exist and --data was not given")
    if data_dir is not None:
        cases += validation_cases(data_dir, val_cases or cfg.val_cases)
    if real_dir is None:  # the real scans shipped with the library (spleen_utils.samples)
        from .evaluate import real_cases as shipped_cases

        cases += [{"name": c["name"], "image": c["image"], "label": c["label"], "source": "real"} for c in shipped_cases()[0]]
    elif real_dir is not False:
        cases += real_cases(real_dir)
    if not cases:
        raise SpleenError("nothing to compare on: give a dataset (--data) or the real CT fixtures (--real).")
    return cases, notes, data_dir


def _compare_case(case: dict[str, str], predictors: dict[str, Any], pairs: list[tuple[str, str]], say: Callable[[str], None]) -> dict[str, Any]:
    """One case segmented by every predictor: Dice against its label, voxels, seconds, window
    plan, and the agreement of each pair of backends."""
    from .preprocess import prepare
    from .io import load_nifti
    from .metrics import dice

    vol = load_nifti(case["image"])
    label = load_nifti(case["label"], what="label", dtype=None)
    if label.shape != vol.shape:
        raise SpleenError(f"{case['label']}: the label's shape {label.shape} differs from its image's {vol.shape}.")
    lab = label.array > 0
    masks, seconds, plans = {}, {}, {}
    for k, p in predictors.items():
        say(f"{case['name']}: {k}")
        t0 = time.perf_counter()
        masks[k], _ = p.predict_volume(vol)
        seconds[k] = time.perf_counter() - t0
    prep = prepare(vol, next(iter(predictors.values())).recipe) if predictors else None
    for k, p in predictors.items():
        plans[k] = p.window_plan(tuple(prep.image.shape)) if prep is not None and not isinstance(prep, str) else None
    return {
        "name": case["name"],
        "source": case["source"],
        "image": case["image"],
        "shape": list(vol.shape),
        "label_voxels": int(lab.sum()),
        "dice": {k: dice(m, lab) for k, m in masks.items()},
        "voxels": {k: int(m.sum()) for k, m in masks.items()},
        "seconds": seconds,
        "window_plan": plans,
        "agreement": {f"{a}|{b}": dice(masks[a], masks[b]) for a, b in pairs},
        "differing_voxels": {f"{a}|{b}": int((masks[a] != masks[b]).sum()) for a, b in pairs},
    }


def _summary(rows: list[dict[str, Any]], keys: list[str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Mean Dice per backend, the lowest agreement per pair, and whether torch fp32 and ONNX
    Runtime fp32 meet :data:`AGREEMENT_TARGET`."""
    summary = {
        "mean_dice": {k: float(np.mean([r["dice"][k] for r in rows])) for k in keys},
        "min_agreement": {f"{a}|{b}": min(r["agreement"][f"{a}|{b}"] for r in rows) for a, b in pairs},
    }
    target_pair = "torch-fp32|onnx-fp32"
    if target_pair in summary["min_agreement"]:
        summary["target"] = {
            "pair": target_pair,
            "threshold": AGREEMENT_TARGET,
            "min": summary["min_agreement"][target_pair],
            "met": summary["min_agreement"][target_pair] >= AGREEMENT_TARGET,
        }
    return summary


def format_comparison(record: dict[str, Any]) -> str:
    """The record as the tables ``spleen-seg compare-backends`` prints."""
    keys = list(record["backends"])
    lines = [f"backends on {record['device']} ({record['hardware'].get('cpu')}{', ' + record['hardware']['gpu'] if record['hardware'].get('gpu') else ''}), {record['date']}"]
    for k in keys:
        lines.append(f"  {k:<12} {record['backends'][k]}")
    for m in record["unavailable"]:
        lines.append(f"  {m['key']:<12} not run: {m['reason']}")
    lines.append("")
    lines.append("Dice against the label (seconds per case)")
    head = f"  {'case':<24}{'source':<12}" + "".join(f"{k:>20}" for k in keys)
    lines.append(head)
    for r in record["cases"]:
        cells = "".join(f"{r['dice'][k]:>12.4f} ({r['seconds'][k]:>4.1f}s)" for k in keys)
        lines.append(f"  {r['name']:<24}{r['source']:<12}{cells}")
    lines.append(f"  {'mean':<36}" + "".join(f"{record['summary']['mean_dice'][k]:>12.4f}        " for k in keys))
    pairs = list(record["summary"]["min_agreement"])
    if pairs:
        lines.append("")
        lines.append("agreement between backends: Dice of their masks (differing voxels)")
        lines.append(f"  {'case':<24}" + "".join(f"{p.replace('|', ' vs '):>26}" for p in pairs))
        for r in record["cases"]:
            lines.append(f"  {r['name']:<24}" + "".join(f"{r['agreement'][p]:>16.5f} ({r['differing_voxels'][p]:>6})" for p in pairs))
        lines.append(f"  {'min':<24}" + "".join(f"{record['summary']['min_agreement'][p]:>16.5f}         " for p in pairs))
    t = record["summary"].get("target")
    if t:
        lines.append("")
        lines.append(f"target {t['pair'].replace('|', ' vs ')} >= {t['threshold']}: {'met' if t['met'] else 'NOT met'} (min {t['min']:.5f})")
    for n in record.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def agreement_matrix(record: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """``(backends, M)``: the minimum agreement over cases of each pair (1 on the diagonal)."""
    keys = list(record["backends"])
    m = np.ones((len(keys), len(keys)))
    for pair, v in record["summary"]["min_agreement"].items():
        a, b = pair.split("|")
        i, j = keys.index(a), keys.index(b)
        m[i, j] = m[j, i] = v
    return keys, m


def load_record(path: str | Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpleenError(f"{path}: not a readable comparison record ({type(e).__name__}).") from None
    if doc.get("format") != COMPARE_FORMAT:
        raise SpleenError(f"{path}: not a spleen_utils comparison record (expected format {COMPARE_FORMAT}).")
    return doc
