"""The model-file contract: what a checkpoint, an ONNX file and a TensorRT engine's sidecar hold.

Each of the three formats describes itself (MONAI bundles' ``metadata.json`` is the anchor): the
network arguments, the recipe (spacing, HU window, patch and window sizes), the labels and the
library versions travel inside the file, so ``predict``, the C++ program and the service need
nothing but the file. This module declares that contract once (format strings, tensor names,
metadata keys) and reads and validates it; :mod:`spleen_utils.model` writes checkpoints,
:mod:`spleen_utils.export` writes ONNX files and engines, :mod:`spleen_utils.backends` reads all
three. It imports neither torch nor onnx at module level.

The ONNX file's ``metadata_props`` (string values, JSON for structures):

=============================  =====================================================================
key                            value
=============================  =====================================================================
``spleen_utils.format``        ``spleen_utils.onnx/1`` (:data:`ONNX_FORMAT`)
``recipe``                     JSON of :meth:`Recipe.to_dict` (pixdim, orientation, hu_window,
                               patch_size, sw_roi, sw_batch_size, overlap, labels, ...)
``network``                    JSON of the network's keyword arguments (``monai.networks.nets.UNet``)
``network_name``               the network class
``labels``                     JSON list of label names, index = channel
``source_checkpoint_sha256``   SHA-256 of the ``.pt`` file it came from
``source_checkpoint``          JSON: file name, the checkpoint's versions and scalar extras (epoch, metric)
``versions``                   JSON: libraries at export time (torch, monai, onnx, onnxruntime, ...)
``opset``                      the ``ai.onnx`` opset of the graph
``exporter``                   ``dynamo`` or ``torchscript``
=============================  =====================================================================

Input ``input`` is ``(N, 1, X, Y, Z)`` float32 (windowed to [0, 1]); output ``output`` is
``(N, C, X, Y, Z)`` float32 logits; spatial sizes are multiples of :func:`spatial_multiple`.
A TensorRT engine carries no metadata: ``<engine>.json`` beside it holds the ONNX metadata plus
the engine's shape profile and precision.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Recipe
from .errors import SpleenError

CHECKPOINT_FORMAT = "spleen_utils.checkpoint/1"
ONNX_FORMAT = "spleen_utils.onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
NETWORK_NAME = "monai.networks.nets.UNet"
#: ONNX metadata keys whose values are JSON
ONNX_JSON_KEYS = ("recipe", "network", "labels", "versions", "source_checkpoint")
ONNX_REQUIRED_KEYS = ("spleen_utils.format", "recipe", "network", "labels", "source_checkpoint_sha256", "versions", "opset", "exporter")
#: checkpoint entries that are not scalar facts about the run (the ONNX file copies the scalars)
_CHECKPOINT_STRUCTURES = ("state_dict", "optimizer", "scaler", "network", "recipe", "labels", "versions", "format")


def spatial_multiple(recipe: Recipe) -> int:
    """Spatial sizes the network accepts are multiples of this (product of the strides: 16)."""
    return int(math.prod(int(s) for s in recipe.strides))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (how an ONNX file names the checkpoint it was exported from)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------
# checkpoint (.pt)


def checkpoint_contents(state_dict: Mapping[str, Any], recipe: Recipe, **extra: Any) -> dict[str, Any]:
    """The dict a checkpoint holds: the weights plus everything needed to use them."""
    from .provenance import versions

    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": dict(state_dict),
        "network": {"name": NETWORK_NAME, "kwargs": recipe.network_kwargs()},
        "recipe": recipe.to_dict(),
        "labels": list(recipe.labels),
        "versions": versions(),
        **extra,
    }


def check_checkpoint(ckpt: Any, source: str | Path) -> dict[str, Any]:
    """``ckpt`` (as ``torch.load`` returned it) validated as a spleen_utils checkpoint."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SpleenError(f"{source}: not a spleen_utils checkpoint (expected format {CHECKPOINT_FORMAT}).")
    Recipe.from_model(ckpt.get("recipe"), str(source))  # a recipe read from a file is validated
    return ckpt


def checkpoint_scalars(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's scalar facts about its run (epoch, metric, ...), without the structures."""
    return {k: v for k, v in ckpt.items()
            if k not in _CHECKPOINT_STRUCTURES and isinstance(v, (int, float, str, bool, type(None)))}


# ----------------------------------------------------------------------------------------------
# ONNX file


def onnx_metadata(ckpt_path: Path, ckpt: Mapping[str, Any], recipe: Recipe, opset: int, exporter: str) -> dict[str, str]:
    """The ``metadata_props`` an exported ONNX file carries (all strings)."""
    from .provenance import EXPORT_LIBRARIES, versions

    network = ckpt.get("network") or {}
    return {
        "spleen_utils.format": ONNX_FORMAT,
        "recipe": json.dumps(recipe.to_dict()),
        "network": json.dumps(network.get("kwargs", recipe.network_kwargs())),
        "network_name": str(network.get("name", NETWORK_NAME)),
        "labels": json.dumps(list(recipe.labels)),
        "source_checkpoint_sha256": file_sha256(ckpt_path),
        "source_checkpoint": json.dumps({"file": ckpt_path.name, "versions": ckpt.get("versions", {}), **checkpoint_scalars(ckpt)}),
        "versions": json.dumps(versions(EXPORT_LIBRARIES)),
        "opset": str(int(opset)),
        "exporter": exporter,
    }


def parse_onnx_metadata(props: Mapping[str, str], source: str | Path = "model") -> dict[str, Any]:
    """The string metadata of a spleen_utils ONNX model (from onnx or an ORT session), decoded and
    validated: ``{"format", "recipe", "network", "labels", "source_checkpoint_sha256", "versions",
    "opset", "exporter", ...}`` with the JSON values decoded and ``opset`` an int."""
    fmt = props.get("spleen_utils.format")
    if fmt is None:
        raise SpleenError(
            f"{source}: an ONNX model without spleen_utils metadata; export it with spleen_utils.export.export_onnx "
            "so that it carries its recipe."
        )
    if fmt != ONNX_FORMAT:
        raise SpleenError(f"{source}: spleen_utils ONNX format {fmt!r} is not the one this version reads ({ONNX_FORMAT}).")
    missing = [k for k in ONNX_REQUIRED_KEYS if k not in props]
    if missing:
        raise SpleenError(f"{source}: the spleen_utils metadata lacks {', '.join(missing)}; export the model again.")
    out: dict[str, Any] = {"format": fmt}
    for k, v in props.items():
        if k == "spleen_utils.format":
            continue
        if k in ONNX_JSON_KEYS:
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                raise SpleenError(f"{source}: the metadata entry {k!r} is not valid JSON; export the model again.") from None
        elif k == "opset":
            out[k] = int(v)
        else:
            out[k] = v
    Recipe.from_model(out.get("recipe"), str(source))  # a recipe read from a file is validated
    return out


def load_onnx(path: str | Path):
    """The ONNX model in ``path`` (weights inline), or one sentence saying why it cannot be read."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise SpleenError(f"{path}: no such ONNX file.")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx raises others
        raise SpleenError(f"{path}: not a readable ONNX model ({type(e).__name__}).") from None


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed spleen_utils metadata of an ONNX file (see :func:`parse_onnx_metadata`)."""
    model = load_onnx(path)
    return parse_onnx_metadata({p.key: p.value for p in model.metadata_props}, path)


# ----------------------------------------------------------------------------------------------
# TensorRT engine sidecar


def engine_sidecar(engine_path: str | Path) -> Path:
    """The JSON description written beside an engine: ``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_sidecar(
    engine_path: str | Path,
    onnx_meta: Mapping[str, Any],
    shapes: Sequence[Sequence[int]],
    precision: str = "fp16",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<engine>.json``: the ONNX metadata plus ``engine`` (profile shapes, precision, ...).

    :func:`spleen_utils.export.build_trt_engine` calls it; after a ``trtexec`` build, call it by
    hand with ``read_onnx_metadata(onnx)`` and the shapes given to trtexec.
    """
    from .provenance import write_json

    doc = dict(onnx_meta)
    doc["engine"] = {
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "profile": {k: list(s) for k, s in zip(("min", "opt", "max"), shapes)},
        "precision": precision,
        **(extra or {}),
    }
    return write_json(doc, engine_sidecar(engine_path))


def read_engine_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The sidecar of an engine, checked to be a spleen_utils description."""
    path = engine_sidecar(engine_path)
    if not path.exists():
        raise SpleenError(
            f"{engine_path}: its description {path.name} is missing (an engine file carries no recipe); "
            "rebuild it with spleen_utils.export.build_trt_engine, or write it with spleen_utils.artifact.write_engine_sidecar."
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpleenError(f"{path}: not a readable engine description ({type(e).__name__}).") from None
    if not isinstance(doc, dict) or doc.get("format") != ONNX_FORMAT or "recipe" not in doc:
        raise SpleenError(f"{path}: not a spleen_utils engine description (expected format {ONNX_FORMAT}).")
    return doc
