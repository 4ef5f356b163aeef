"""The generated set on disk: the MSD Task09 layout, ``dataset.json``, and writing it whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import save_nifti
from ..progress import report
from ..provenance import write_json
from .header import Phantom, nifti_header
from .phantom import generate_case

#: recorded in dataset.json; bump VERSION whenever the phantoms a seed gives change.
GENERATOR = "spleen_utils.synthetic"
VERSION = 4  # 3: tissue maps, label-map cases, validation folds; 4: thicker voxels, thick-slice look
#: cases per dataset seed: case ``i`` of dataset ``seed`` is phantom ``seed * 1000 + i``.
CASES_PER_SEED = 1000


def case_seed(seed: int, index: int) -> int:
    """The phantom seed of case ``index`` (1-based, ``spleen_<index>``) of dataset ``seed``."""
    return int(seed) * CASES_PER_SEED + int(index)


def _record(seed: int, cases: int, test_cases: int, labelmap_cases: int = 0, val_per_source: int = 0) -> dict:
    rec = {"generator": GENERATOR, "seed": int(seed), "cases": int(cases), "test_cases": int(test_cases), "version": VERSION}
    if labelmap_cases or val_per_source:
        rec.update(labelmap_cases=int(labelmap_cases), val_per_source=int(val_per_source))
    return rec


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(folder: Path, record: dict) -> bool:
    """``folder`` holds the synthetic set ``record`` describes, every listed file present."""
    meta = _read_meta(folder)
    if not isinstance(meta, dict) or meta.get("synthetic") != record:
        return False
    files = [e[k] for e in meta.get("training", []) for k in ("image", "label", "tissue") if k in e] + list(meta.get("test", []))
    return all((folder / f).is_file() for f in files)


def _remove_stale_partials(root: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Partial folders that interrupted runs left behind (a running one is younger)."""
    now = time.time()
    for p in root.glob(f".{name}.partial-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


#: the case list of a set: (case index, source name, fold) -- fold "validation" or "training"
def case_plan(cases: int, labelmap_names: list[str], labelmap_cases: int, val_per_source: int) -> list[tuple[int, str, str]]:
    """Which case is what: phantoms first, then ``labelmap_cases`` cases of each label map.

    Within each source the last ``val_per_source`` cases validate (0: no folds recorded; the
    tutorial's rule, the last cases of the sorted list, then applies).
    """
    plan, index = [], 0
    groups = [("phantom", cases)] + [(f"labelmap:{n}", labelmap_cases) for n in labelmap_names]
    for source, n in groups:
        for k in range(n):
            index += 1
            fold = "validation" if val_per_source and k >= n - val_per_source else "training"
            plan.append((index, source, fold))
    return plan


def dataset_json(name: str, cases: int, test_cases: int, seed: int, plan: list[tuple[int, str, str]] | None = None,
                 labelmap_cases: int = 0, val_per_source: int = 0) -> dict:
    """The ``dataset.json`` of a synthetic set, in the MSD Task09 layout.

    Beyond MSD's keys, each training entry of a set with tissue maps names its ``tissue`` map
    (``tissuesTr/``, the painter's tissue codes), its ``source`` and its ``fold``.
    """
    if plan is None:
        entries = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(1, cases + 1)]
    else:
        entries = [
            {"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz",
             "tissue": f"./tissuesTr/spleen_{i}.nii.gz", "source": source, **({"fold": fold} if val_per_source else {})}
            for i, source, fold in plan
        ]
    n_train = len(entries)
    return {
        "name": name,
        "description": "Synthetic CT-like abdominal images with spleen labels (not patient data): phantoms"
        + (" and CT painted on deformed real label maps" if labelmap_cases else ""),
        "reference": "spleen_utils.synthetic; layout of the Medical Segmentation Decathlon Task09 Spleen",
        "licence": "CC0 1.0 (generated data)" + ("; label-map cases derive from CC BY 4.0 / Apache-2.0 label maps, "
                                                 "see spleen_utils/samples/README.md" if labelmap_cases else ""),
        "release": f"{GENERATOR} v{VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": n_train,
        "numTest": test_cases,
        "training": entries,
        "test": [f"./imagesTs/spleen_{i}.nii.gz" for i in range(n_train + 1, n_train + test_cases + 1)],
        "synthetic": _record(seed, cases, test_cases, labelmap_cases, val_per_source),
    }


def write_synthetic_dataset(
    root: str | Path = "data",
    cases: int = 12,
    test_cases: int = 3,
    seed: int = 0,
    name: str = "Synthetic_Spleen",
    progress: bool = True,
    labelmap_cases: int = 0,
    val_per_source: int = 0,
) -> Path:
    """Write root/name/ in MSD layout; returns that folder.

    Case ``spleen_i`` is ``make_phantom(case_seed(seed, i))``: training cases are 1..cases
    (image and label), test cases continue the numbering (image only). Nothing is done when the
    folder already holds this very set (same generator version, seed and counts). Otherwise the
    set is written into a hidden sibling folder and renamed into place once complete, so a folder
    named ``name`` is never half-written; an older synthetic set is replaced only then. A folder of
    that name that this generator did not write (no ``"synthetic"`` record) is never replaced.
    """
    cases, test_cases, seed = int(cases), int(test_cases), int(seed)
    if cases < 1 or test_cases < 0 or cases + test_cases >= CASES_PER_SEED:
        raise DataError(f"cannot write {cases} training and {test_cases} test cases; use 1 to {CASES_PER_SEED - 1} cases in all.")
    if seed < 0:
        raise DataError(f"the synthetic dataset's seed must be >= 0, not {seed}.")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise DataError(f"{name!r} is not a folder name.")
    root = Path(root)
    target = root / name
    record = _record(seed, cases, test_cases, labelmap_cases, val_per_source)
    if _complete(target, record):
        return target
    if target.exists():
        meta = _read_meta(target)
        ours = isinstance(meta, dict) and isinstance(meta.get("synthetic"), dict) and meta["synthetic"].get("generator") == GENERATOR
        if not target.is_dir() or not (ours or not any(target.iterdir())):
            raise DataError(
                f"{target}: exists and was not written by {GENERATOR}; move it away or choose another name, "
                "it will not be overwritten."
            )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        tissues = bool(labelmap_cases or val_per_source)
        for sub in ("imagesTr", "labelsTr", "imagesTs") + (("tissuesTr",) if tissues else ()):
            (partial / sub).mkdir()
        maps = _label_map_sources() if labelmap_cases else []
        plan = case_plan(cases, [m.name for m in maps], labelmap_cases, val_per_source) if tissues else None
        n_train = len(plan) if plan else cases
        sources = dict((i, src) for i, src, _ in plan) if plan else {}
        jobs = [(i, sources.get(i, "phantom"), case_seed(seed, i), str(partial), i <= n_train, tissues)
                for i in range(1, n_train + test_cases + 1)]
        workers = max(1, min(os.cpu_count() or 1, 4, len(jobs) // 4))
        step = f"generating {name}"
        report(step, 0, len(jobs), unit="case")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc=f"synthetic {name}", unit="case")
        if workers > 1:  # cases are independent and deterministic per seed: any order, same files
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                for done, _ in enumerate(pool.map(_write_case, jobs), 1):
                    report(step, done, len(jobs), unit="case")
                    if bar is not None:
                        bar.update()
        else:
            for done, job in enumerate(jobs, 1):
                _write_case(job)
                report(step, done, len(jobs), unit="case")
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        meta = dataset_json(name, cases, test_cases, seed, plan, labelmap_cases, val_per_source)
        write_json(meta, partial / "dataset.json")
        _make_readable(partial)
        _swap_into_place(partial, target, record)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _label_map_sources() -> list:
    """The real label maps shipped with the package (:func:`spleen_utils.samples.label_maps`)."""
    from ..samples import label_maps

    return label_maps()


#: label-map anatomies loaded in this process (each is read and resampled once per process)
_ANATOMIES: dict[str, Any] = {}


def _labelmap_case(name: str, seed: int) -> Phantom:
    """Case ``seed`` from the shipped label map ``name``."""
    from .. import labelmaps

    if name not in _ANATOMIES:
        m = next(m for m in _label_map_sources() if m.name == name)
        _ANATOMIES[name] = labelmaps.resample_nearest(labelmaps.load_anatomy(m.path, m.labels, m.scheme, m.name))
    return labelmaps.make_case(_ANATOMIES[name], seed)


def _worker_init() -> None:
    try:  # one thread per worker process: the workers already use every core
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def _write_case(job: tuple) -> int:
    """Generate case ``i`` of a set and write its files into the partial folder."""
    i, source, seed, folder, training, tissues = job
    folder = Path(folder)
    case = generate_case(seed) if source == "phantom" else _labelmap_case(source.split(":", 1)[1], seed)
    hdr = nifti_header()
    if training:
        save_nifti(case.image, case.affine, folder / "imagesTr" / f"spleen_{i}.nii.gz", header=hdr)
        save_nifti(case.label, case.affine, folder / "labelsTr" / f"spleen_{i}.nii.gz", header=hdr)
        if tissues:
            save_nifti(case.tissues, case.affine, folder / "tissuesTr" / f"spleen_{i}.nii.gz", header=hdr)
    else:
        save_nifti(case.image, case.affine, folder / "imagesTs" / f"spleen_{i}.nii.gz", header=hdr)
    return i


def _make_readable(folder: Path) -> None:
    """mkdtemp / mkstemp create private folders and files; a dataset is not private."""
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _swap_into_place(partial: Path, target: Path, record: dict) -> None:
    """Rename the complete ``partial`` to ``target``, replacing an older set only now."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        os.rename(partial, target)
    except OSError:
        if _complete(target, record):  # another process wrote the same set first
            return
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_profile_dataset(cfg, progress: bool = True) -> Path:
    """The generated set a :class:`spleen_utils.config.Config` trains on (idempotent, see above)."""
    return write_synthetic_dataset(cfg.data_root, cases=cfg.synthetic_cases, test_cases=cfg.synthetic_test_cases,
                                   seed=cfg.seed, name=cfg.dataset, progress=progress,
                                   labelmap_cases=cfg.labelmap_cases, val_per_source=cfg.val_per_source)
