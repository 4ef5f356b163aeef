"""Real CT and real label maps that ship with the package, so a fresh install has real data offline.

Only redistributable data is here (see ``README.md`` in this folder for sources, licences,
attribution, geometry and what was changed):

* :func:`real_cases` -- real CT scans with spleen labels: ``msd_spleen_8`` (manual label,
  CC BY-SA 4.0) and ``totalseg_ct_3mm`` (label predicted by TotalSegmentator, Apache-2.0).
* :func:`label_maps` -- real multi-organ label maps without images (TotalSegmentator and AMOS
  subjects, CC BY 4.0) plus the organ map of ``totalseg_ct_3mm``.
* :func:`validation_cases` -- real scans that may be used for validation but not shipped
  (``ircad_1``, CC BY-NC-ND 4.0), found in ``$SPLEEN_REAL_DATA`` or ``../shared/data/real``.

Importing this module reads nothing and imports neither numpy, nibabel, torch nor MONAI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

__all__ = [
    "SAMPLES_DIR",
    "RealCase",
    "LabelMap",
    "real_cases",
    "real_case",
    "label_maps",
    "label_map",
    "validation_cases",
    "real_data_dir",
    "attribution",
]

#: the folder holding the shipped files
SAMPLES_DIR = Path(__file__).resolve().parent

#: the environment variable naming a folder with the non-shipped real scans
REAL_DATA_ENV = "SPLEEN_REAL_DATA"


@dataclass(frozen=True)
class RealCase:
    """A real CT scan and its spleen mask (0/1) on the same voxel grid."""

    name: str
    image: Path
    label: Path
    licence: str  # SPDX identifier
    label_source: str  # "manual" (drawn by people) or "model" (predicted by a network)
    organs: Path | None = None  # a multi-organ label map on the same grid, where there is one


@dataclass(frozen=True)
class LabelMap:
    """A real multi-organ label map (no image); ``labels`` maps voxel value -> structure name."""

    name: str
    path: Path
    labels: dict[int, str] = field(hash=False)
    scheme: str  # "totalseg" (TotalSegmentator "total" classes) or "amos" (AMOS's 15 classes)
    licence: str  # SPDX identifier

    def value_of(self, structure: str) -> int:
        """The voxel value of ``structure`` (for example ``"spleen"`` or ``"liver"``)."""
        for value, name in self.labels.items():
            if name == structure:
                return value
        raise DataError(f"label map {self.name!r} has no structure named {structure!r}.")


# (name, label file stem, licence, who drew the label, multi-organ label map stem or None);
# the image is <name>_image.nii.gz
_REAL_CASES = [
    ("msd_spleen_8", "msd_spleen_8_label", "CC-BY-SA-4.0", "manual", None),
    ("totalseg_ct_3mm", "totalseg_ct_3mm_spleen", "Apache-2.0", "model", "totalseg_ct_3mm_organs"),
]


def _real_cases() -> list[RealCase]:
    d = SAMPLES_DIR
    return [RealCase(name=name, image=d / f"{name}_image.nii.gz", label=d / f"{label}.nii.gz", licence=licence,
                     label_source=source, organs=None if organs is None else d / f"{organs}.nii.gz")
            for name, label, licence, source, organs in _REAL_CASES]


def real_cases() -> list[RealCase]:
    """The shipped real CT scans with spleen labels."""
    return _real_cases()


def real_case(name: str) -> RealCase:
    """The shipped real case called ``name``; :class:`DataError` for an unknown name or missing files."""
    cases = {c.name: c for c in _real_cases()}
    if name not in cases:
        hint = " (it may not be shipped; see validation_cases())" if name == "ircad_1" else ""
        raise DataError(
            f"unknown real sample {name!r}{hint}; the shipped ones are: {', '.join(cases)}."
        )
    case = cases[name]
    missing = [p.name for p in (case.image, case.label) if not p.is_file()]
    if missing:
        raise DataError(
            f"the sample files {', '.join(missing)} are missing from {SAMPLES_DIR}; reinstall spleen-utils."
        )
    return case


# (file stem, scheme, licence)
_LABEL_MAPS = [
    ("s0327_label", "totalseg", "CC-BY-4.0"),
    ("s0328_label", "totalseg", "CC-BY-4.0"),
    ("amos_0013_label", "amos", "CC-BY-4.0"),
    ("totalseg_ct_3mm_organs", "totalseg", "Apache-2.0"),
]


def label_maps() -> list[LabelMap]:
    """The shipped real multi-organ label maps, with value -> name read from their ``.labels.json``."""
    out = []
    for stem, scheme, licence in _LABEL_MAPS:
        meta = SAMPLES_DIR / f"{stem}.labels.json"
        try:
            labels = json.loads(meta.read_text(encoding="utf-8"))["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read the label names of {stem} from {meta}: {e}.") from e
        out.append(
            LabelMap(
                name=stem,
                path=SAMPLES_DIR / f"{stem}.nii.gz",
                labels={int(k): str(v) for k, v in labels.items()},
                scheme=scheme,
                licence=licence,
            )
        )
    return out


def label_map(name: str) -> LabelMap:
    """The shipped label map called ``name``; :class:`DataError` for an unknown name."""
    maps = {m.name: m for m in label_maps()}
    if name not in maps:
        raise DataError(f"unknown label map {name!r}; the shipped ones are: {', '.join(maps)}.")
    return maps[name]


def real_data_dir(require: str | None = None) -> Path | None:
    """The folder of the real CT kept beside the project (never shipped), or None when it is not there.

    ``$SPLEEN_REAL_DATA`` when that is set (and then only it), else ``../shared/data/real`` beside the
    project. The folder counts when it holds ``require`` (a file name), or by default any NIfTI file.
    The one rule the library, the notebooks and the tests use to find it.
    """
    env = os.environ.get(REAL_DATA_ENV)
    if env:
        d = Path(env).expanduser()
    else:
        from ..config import PROJECT_ROOT

        d = PROJECT_ROOT.parent / "shared" / "data" / "real"
    if not d.is_dir():
        return None
    found = (d / require).is_file() if require else any(d.glob("*.nii*"))
    return d if found else None


def validation_cases() -> list[RealCase]:
    """Real scans usable for validation but not shippable; empty when they are not on this machine.

    ``ircad_1`` (3D-IRCADb-01 patient 1, manual spleen mask, CC BY-NC-ND 4.0) is looked for in
    ``$SPLEEN_REAL_DATA`` when that is set, else in ``../shared/data/real`` beside the project.
    Its licence forbids shipping it or publishing a model trained on it: validate only.
    """
    d = real_data_dir("ircad_1_image.nii.gz")
    if d is None or not (d / "ircad_1_spleen.nii.gz").is_file():
        return []
    image, label = d / "ircad_1_image.nii.gz", d / "ircad_1_spleen.nii.gz"
    return [
        RealCase(
            name="ircad_1",
            image=image,
            label=label,
            licence="CC-BY-NC-ND-4.0",
            label_source="manual",
            organs=None,
        )
    ]


def attribution() -> str:
    """A short Markdown paragraph naming the shipped data's sources and licences."""
    return (
        "The real data shipped with `spleen_utils` comes from: the Medical Segmentation Decathlon, "
        "Task09 Spleen, case `spleen_8` (Simpson et al., 2019, via NVIDIA's clara-train-examples; "
        "header corrected to RAS here), "
        "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/); "
        "TotalSegmentator's example CT and its model-predicted organ labels "
        "(Wasserthal et al., 2023, TotalSegmentator test reference files; CT stored as int16 here), "
        "[Apache-2.0](https://www.apache.org/licenses/LICENSE-2.0); "
        "TotalSegmentator dataset v2 subjects s0327 and s0328 (Wasserthal et al., *Radiology: AI* 2023, "
        "doi:10.1148/ryai.230024, dataset doi:10.5281/zenodo.6802613; per-structure masks merged into "
        "one map) and AMOS22 case amos_0013 (Ji et al., NeurIPS 2022, doi:10.5281/zenodo.7262581), "
        "[CC BY 4.0](https://creativecommons.org/licenses/by/4.0/). "
        "The 3D-IRCADb-01 scan used for validation (IRCAD France, CC BY-NC-ND 4.0) is not shipped."
    )
