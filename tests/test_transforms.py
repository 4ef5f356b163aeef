"""The one preprocessing spec (spleen_utils.transforms) and the C++ program that mirrors it.

The MONAI reference chain and the fast array path (``spleen_utils.preprocess.prepare``) are held equal
on small volumes by ``tests/test_infer.py::test_preprocessing_equals_monai_transforms``; here:
the chain is built from the recipe's fields, and the C++ program reads those same fields, under
the same names, from the ONNX metadata the Python exporter writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from spleen_utils.artifact import ONNX_FORMAT, onnx_metadata
from spleen_utils.config import Recipe
from spleen_utils.transforms import PREPROCESSING_FIELDS, WINDOW_FIELDS, inference_transforms, load_transforms

CPP_SRC = Path(__file__).resolve().parents[1] / "cpp" / "src"


def _cpp_recipe_fields() -> set[str]:
    """The recipe fields cpp/src/recipe.cpp reads from the JSON (``field``, ``numbers<N>``, ``find``)."""
    text = (CPP_SRC / "recipe.cpp").read_text()
    return set(re.findall(r'(?:field|numbers<\d+>)\(j, "([^"]+)"\)', text)) | set(re.findall(r'\bj\.find\("([^"]+)"\)', text))


def _cpp_metadata_keys() -> set[str]:
    """The ONNX metadata keys cpp/src/main.cpp looks up."""
    return set(re.findall(r'LookupCustomMetadataMapAllocated\("([^"]+)"', (CPP_SRC / "main.cpp").read_text()))


def _python_metadata(tmp_path: Path) -> dict[str, str]:
    """The metadata an exported ONNX file carries (what :func:`spleen_utils.export.export_onnx` writes)."""
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    return onnx_metadata(ckpt, {}, Recipe(), 17, "torchscript")


def test_the_chain_is_built_from_the_spec_fields():
    """Each preprocessing field changes the MONAI chain's step that it names (nothing hard-coded)."""
    recipe = Recipe(hu_window=(-100.0, 200.0), orientation="LPS", pixdim=(2.0, 2.5, 3.0))
    scale, crop, orient, spacing = inference_transforms(recipe).transforms
    assert (scale.scaler.a_min, scale.scaler.a_max, scale.scaler.b_min, scale.scaler.b_max) == (-100.0, 200.0, 0.0, 1.0)
    assert scale.scaler.clip and type(crop).__name__ == "CropForegroundd"
    assert orient.ornt_transform.axcodes == "LPS"
    assert np.allclose(spacing.spacing_transform.pixdim, (2.0, 2.5, 3.0))
    # training, validation and the benchmark's baseline load files and then apply the same steps
    names = [type(t).__name__ for t in load_transforms(recipe, keys=("image",)).transforms]
    assert names[:2] == ["LoadImaged", "EnsureChannelFirstd"]
    assert names[2:6] == [type(t).__name__ for t in inference_transforms(recipe).transforms]


def test_cpp_reads_the_recipe_the_python_exporter_writes(tmp_path):
    """Renaming a metadata key or a recipe field on one side only fails here."""
    meta = _python_metadata(tmp_path)
    keys = _cpp_metadata_keys()
    assert keys == {"spleen_utils.format", "recipe"} and keys <= set(meta)
    assert f'"{ONNX_FORMAT}"' in (CPP_SRC / "main.cpp").read_text()  # the format the C++ program accepts
    written = set(json.loads(meta["recipe"]))
    read = _cpp_recipe_fields()
    assert read <= written, f"the C++ program reads recipe fields the exporter does not write: {sorted(read - written)}"
    # every field of the spec (preprocessing and sliding window) is read by the C++ program too
    spec = set(PREPROCESSING_FIELDS) | set(WINDOW_FIELDS)
    assert spec <= read, f"the C++ program does not read {sorted(spec - read)}"
    assert spec <= written and {"labels", "strides"} <= read


def test_cpp_names_the_spec_it_mirrors():
    header = (CPP_SRC / "pipeline.hpp").read_text()
    assert "spleen_utils/transforms.py" in header and "spleen_utils.preprocess.prepare" in header
    for name in (*PREPROCESSING_FIELDS, *WINDOW_FIELDS):
        assert name in header
