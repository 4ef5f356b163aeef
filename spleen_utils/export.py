"""ONNX export and validation, and the TensorRT engine build.

One self-contained ONNX file per model
--------------------------------------
:func:`export_onnx` turns a checkpoint (see :mod:`spleen_utils.model`) into one ``.onnx`` file
with the weights inline (no external data file). Input ``input`` is ``(N, 1, X, Y, Z)`` float32,
output ``output`` is ``(N, C, X, Y, Z)`` float32 logits; the batch and all three spatial axes are
dynamic (the residual UNet needs spatial sizes divisible by 16, the product of its strides).
The file describes itself in ``metadata_props``: the recipe, network, labels, the source
checkpoint's hash and the library versions (the keys are declared in :mod:`spleen_utils.artifact`),
so ``predict``, the C++ program and the service need nothing else.

Which exporter, and why
-----------------------
PyTorch 2.13 has two ONNX exporters behind :func:`torch.onnx.export`:

* ``dynamo=True`` (``torch.export`` + onnxscript), the default since PyTorch 2.9 and the one that
  is maintained. It implements opset 18 and newer only: asked for an older opset it warns, tries
  the ONNX version converter and, for this network, silently keeps opset 18. Its dynamic shapes
  are declared with ``torch.export.Dim`` and carry the divisibility constraint
  (``16*sx``), and its optimiser folds the batch norms into the convolutions.
* ``dynamo=False`` (TorchScript tracing), deprecated (it warns) but still shipped; for this
  network it writes the old opsets too: 7 to 21 all export and pass the checker here, including the
  seed project's opset 12.

So ``exporter="auto"`` (the default) uses **dynamo for opset >= 18** (the default opset, 18, is
the first one dynamo supports and is read by ONNX Runtime >= 1.14 and TensorRT 10) and the
**TorchScript exporter for opset < 18** (e.g. 12, for older runtimes); ``exporter=`` forces
either where it can (TorchScript at opset >= 18 works too). With random weights both agree with
PyTorch to about 6e-7 on random and real CT patches (ONNX Runtime 1.32, CPU); both give a graph of
the same operators (Conv, ConvTranspose, PRelu, Add, Concat; TorchScript keeps the batch norms that
follow transposed convolutions). Whatever produced the file, the actual opset is checked and
written to the metadata.

Validation is part of the export: ONNX Runtime (CPU) and PyTorch fp32 run the same inputs, random
patches of two shapes and, when given, a real CT patch; the file is written (atomically: a temporary
file, then a rename) only when every output agrees to :data:`TOLERANCE`.

TensorRT
--------
:func:`build_trt_engine` is written against the TensorRT 10 Python API (``Builder``,
``OnnxParser``, a workspace memory-pool limit, the FP16 flag and one optimisation profile on
``input``). The engine file carries no metadata, so the build writes a sidecar
``<engine>.json`` with the ONNX file's metadata and the engine's shape profile; the TensorRT
backend reads it. Without TensorRT (or without a GPU) it raises :class:`SpleenError` with the
equivalent ``trtexec`` command line (:func:`trtexec_command`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Recipe
from .errors import SpleenError
from .io import atomic_path, temp_beside
from .model import load_model

# the file contract (tensor names, metadata keys, the sidecar) is declared in the torch-free
# artifact module; the exporter writes what it declares
from .artifact import (INPUT_NAME, OUTPUT_NAME, engine_sidecar, file_sha256, onnx_metadata, read_onnx_metadata, spatial_multiple,
                       write_engine_sidecar)

DEFAULT_OPSET = 18
#: the lowest opset the dynamo exporter implements; below it the TorchScript exporter is used
DYNAMO_MIN_OPSET = 18
#: the largest |ONNX Runtime - PyTorch| logit difference an export may show
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporters' deprecation and progress chatter; errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


# ----------------------------------------------------------------------------------------------
# metadata


# ----------------------------------------------------------------------------------------------
# export


def _graph_opset(model) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_graph(model: torch.nn.Module, recipe: Recipe, path: Path, opset: int, exporter: str):
    """Export ``model`` to ``path`` with the chosen exporter; returns the ``onnx.ModelProto``."""
    import onnx

    m = spatial_multiple(recipe)
    # batch 2 and 2*m voxels per axis: no size is 0 or 1, which torch.export would specialise on
    example = torch.zeros(2, 1, 2 * m, 2 * m, 2 * m)
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim

                batch = Dim("batch", min=1, max=4096)
                spatial = {ax: m * Dim(f"s{n}", min=1, max=4096 // m) for ax, n in zip((2, 3, 4), "xyz")}
                program = torch.onnx.export(
                    model,
                    (example,),
                    None,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes={"x": {0: batch, **spatial}},
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
                proto = program.model_proto
            else:
                axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamo=False,
                    dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                    do_constant_folding=True,
                )
                proto = onnx.load(str(path))
    except SpleenError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SpleenError(f"the {exporter} ONNX exporter failed at opset {opset} ({type(e).__name__}: {first}).") from e
    return proto


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    real_image: str | Path | None = None,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export a spleen_utils checkpoint (see model.py) to one self-contained ONNX file; returns a report dict.

    ``exporter``: ``auto`` (dynamo for opset >= 18, TorchScript below), ``dynamo`` or
    ``torchscript``. With ``validate`` the file is run with ONNX Runtime against PyTorch first
    (random patches, and a real CT patch from ``real_image`` when given) and written only if every
    output agrees to :data:`TOLERANCE`.

    Report: ``path``, ``opset``, ``exporter``, ``size_bytes``, ``max_abs_diff`` (per input),
    ``checker`` (``"ok"``), ``seconds`` (total) with ``export_seconds``/``validate_seconds``, and
    ``source_checkpoint_sha256``.
    """
    import onnx

    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    try:
        opset = int(opset)
    except (TypeError, ValueError):
        raise SpleenError(f"opset must be an integer, not {opset!r}.") from None
    if exporter == "auto":
        exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter not in ("dynamo", "torchscript"):
        raise SpleenError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript.")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise SpleenError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer, not {opset}; use exporter='torchscript' "
            "(or auto) for older opsets."
        )
    if real_image is not None and not Path(real_image).exists():
        raise SpleenError(f"{real_image}: no such image for the validation patch.")

    model, recipe, ckpt = load_model(checkpoint, "cpu")  # SpleenError for a missing or damaged file

    tmp = temp_beside(out, ".onnx")
    try:
        proto = _export_graph(model, recipe, tmp, opset, exporter)
        actual = _graph_opset(proto)
        if actual != opset:
            raise SpleenError(f"the {exporter} exporter wrote opset {actual} when {opset} was asked for.")
        del proto.metadata_props[:]
        for k, v in onnx_metadata(checkpoint, ckpt, recipe, actual, exporter).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.doc_string = (
            f"MONAI residual 3D UNet for spleen segmentation on CT ({', '.join(recipe.labels)}), exported by spleen_utils. "
            f"input: float32 (N, 1, X, Y, Z), CT clipped to HU {list(recipe.hu_window)} and scaled to [0, 1], "
            f"resampled to {list(recipe.pixdim)} mm {recipe.orientation}; X, Y, Z multiples of {spatial_multiple(recipe)}. "
            f"output: float32 logits (N, {len(recipe.labels)}, X, Y, Z). The recipe is in metadata_props."
        )
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        del proto
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise SpleenError(f"the exported ONNX model fails onnx.checker ({type(e).__name__}: {str(e)[:300]}).") from None
        t_export = time.perf_counter() - t0

        diffs: dict[str, float] = {}
        if validate:
            diffs = validate_onnx(tmp, model, recipe, real_image=real_image)
        t_validate = time.perf_counter() - t0 - t_export
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    return {
        "path": str(out),
        "opset": actual,
        "exporter": exporter,
        "size_bytes": out.stat().st_size,
        "max_abs_diff": diffs,
        "tolerance": TOLERANCE,
        "checker": "ok",
        "validated": bool(validate),
        "seconds": round(time.perf_counter() - t0, 3),
        "export_seconds": round(t_export, 3),
        "validate_seconds": round(t_validate, 3),
        "source_checkpoint_sha256": file_sha256(checkpoint),
    }


# ----------------------------------------------------------------------------------------------
# validation


def real_patch(image: str | Path, recipe: Recipe, size: Sequence[int] | None = None) -> np.ndarray:
    """A ``(1, 1, *size)`` float32 patch from the middle of a CT, windowed to [0, 1] like the recipe.

    Deliberately simple (no resampling or reorientation): it is a numerical test input with real
    anatomy and real HU statistics, not a preprocessed case. A CT smaller than ``size`` is
    zero-padded at the far end.
    """
    from .io import load_nifti

    size = tuple(int(s) for s in (size or recipe.patch_size))
    a = load_nifti(image).array
    lo, hi = (float(v) for v in recipe.hu_window)
    a = (np.clip(a, lo, hi) - lo) / (hi - lo)
    crop = tuple(min(s, d) for s, d in zip(size, a.shape))
    start = tuple((d - c) // 2 for d, c in zip(a.shape, crop))
    patch = np.zeros(size, dtype=np.float32)
    patch[: crop[0], : crop[1], : crop[2]] = a[tuple(slice(s, s + c) for s, c in zip(start, crop))]
    return patch[None, None]


def validate_onnx(
    onnx_path: str | Path,
    model: torch.nn.Module,
    recipe: Recipe,
    real_image: str | Path | None = None,
    tolerance: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Max |ONNX Runtime (CPU) - PyTorch fp32| per input; :class:`SpleenError` above ``tolerance``.

    Inputs: a random patch of the recipe's patch size, a random batch of 2 at a non-cubic size
    (64 x 80 x 96) and, with ``real_image``, a real CT patch (:func:`real_patch`).
    """
    import onnxruntime as ort

    tolerance = TOLERANCE if tolerance is None else tolerance
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    p = tuple(recipe.patch_size)
    cases = {
        f"random_1x1x{'x'.join(map(str, p))}": torch.rand((1, 1, *p), generator=g),
        "random_2x1x64x80x96": torch.rand((2, 1, 64, 80, 96), generator=g),
    }
    if real_image is not None:
        name = Path(real_image).name.split(".")[0]
        cases[f"real_{name}_1x1x{'x'.join(map(str, p))}"] = torch.from_numpy(real_patch(real_image, recipe))
    model = model.float().eval()
    diffs: dict[str, float] = {}
    for name, x in cases.items():
        with torch.inference_mode():
            ref = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise SpleenError(f"ONNX Runtime returned shape {got.shape} for {name}, PyTorch {ref.shape}.")
        d = float(np.max(np.abs(got.astype(np.float64) - ref)))
        diffs[name] = d
        if not d <= tolerance:  # also catches NaN
            raise SpleenError(
                f"ONNX Runtime and PyTorch disagree by {d:.3g} on {name} (tolerance {tolerance:g}); the ONNX file was not written."
            )
    return diffs


# ----------------------------------------------------------------------------------------------
# TensorRT


def tensorrt_available() -> tuple[bool, str]:
    """``(available, reason)``: TensorRT 10+ importable and a CUDA GPU visible. Never raises."""
    try:
        import tensorrt as trt  # noqa: F401
    except BaseException as e:  # ImportError, or a half-installed stub that exits on import
        if isinstance(e, KeyboardInterrupt):
            raise
        return False, f"the tensorrt Python package is not installed here ({type(e).__name__})"
    try:
        version = str(getattr(trt, "__version__", "0"))
        if int(version.split(".")[0]) < 10:
            return False, f"TensorRT {version} is installed; this code needs TensorRT 10 or newer"
        if not torch.cuda.is_available():
            return False, f"TensorRT {version} is installed, but PyTorch sees no CUDA GPU here"
        return True, f"TensorRT {version} on {torch.cuda.get_device_name(0)}"
    except Exception as e:
        return False, f"TensorRT could not be checked ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class EngineOptions:
    """How a TensorRT engine is built: the keywords :func:`build_trt_engine` and
    :func:`trtexec_command` take.

    One optimisation profile on ``input``: batch ``min/opt/max_batch`` (the sliding-window batch)
    and spatial sizes ``spatial`` = (min, opt, max), by default from the recipe's training patch
    (``patch_size``, what the benchmarks time) to its sliding-window ROI (``sw_roi``, what
    inference feeds), optimised for the ROI. ``fp16`` lets TensorRT choose FP16 kernels (inputs
    and outputs stay float32); ``workspace_gb`` caps the builder's workspace memory pool.
    """

    fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8
    workspace_gb: float = 4
    spatial: Sequence[Sequence[int]] | None = None

    def shapes(self, recipe: Recipe) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of ``input`` for the optimisation profile, checked."""
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        for name, b in zip(("min_batch", "opt_batch", "max_batch"), batches):
            if not isinstance(b, int) or b < 1:
                raise SpleenError(f"{name} must be a positive integer, not {b!r}.")
        if not batches[0] <= batches[1] <= batches[2]:
            raise SpleenError(f"the batch sizes must satisfy min <= opt <= max (got {', '.join(map(str, batches))}).")
        spatial = self.spatial
        if spatial is None:
            patch, roi = tuple(recipe.patch_size), tuple(recipe.sw_roi)
            spatial = (tuple(map(min, patch, roi)), roi, tuple(map(max, patch, roi)))
        spatial = [tuple(int(v) for v in s) for s in spatial]
        m = spatial_multiple(recipe)
        if len(spatial) != 3 or any(len(s) != 3 for s in spatial):
            raise SpleenError("spatial must give three (X, Y, Z) sizes: min, opt and max.")
        if any(v % m or v < m for s in spatial for v in s):
            raise SpleenError(f"the spatial sizes {spatial} must be positive multiples of {m}.")
        if not all(a <= b <= c for a, b, c in zip(*spatial)):
            raise SpleenError(f"the spatial sizes must satisfy min <= opt <= max on each axis (got {spatial}).")
        return tuple((b, 1, *s) for b, s in zip(batches, spatial))  # type: ignore[return-value]


def _recipe_of(onnx_path: Path) -> Recipe:
    try:
        return Recipe.from_dict(read_onnx_metadata(onnx_path)["recipe"])
    except SpleenError:
        return Recipe()


def trtexec_command(onnx_path: str | Path, out: str | Path, recipe: Recipe | None = None, **options: Any) -> str:
    """The ``trtexec`` (TensorRT 10) command line equivalent to :func:`build_trt_engine`.

    ``options`` are :class:`EngineOptions`' fields. The recipe (for the default spatial sizes) is
    read from the ONNX file when it is readable.
    """
    onnx_path, opts = Path(onnx_path), EngineOptions(**options)
    recipe = recipe or _recipe_of(onnx_path)
    lo, opt, hi = opts.shapes(recipe)
    dims = lambda s: "x".join(str(v) for v in s)  # noqa: E731
    parts = [
        "trtexec",
        f"--onnx={shlex.quote(str(onnx_path))}",
        f"--saveEngine={shlex.quote(str(out))}",
        f"--minShapes={INPUT_NAME}:{dims(lo)}",
        f"--optShapes={INPUT_NAME}:{dims(opt)}",
        f"--maxShapes={INPUT_NAME}:{dims(hi)}",
        f"--memPoolSize=workspace:{int(round(opts.workspace_gb * 1024))}",  # MiB
    ]
    if opts.fp16:
        parts.append("--fp16")
    return " ".join(parts)


def build_trt_engine(onnx_path: str | Path, out: str | Path, **options: Any) -> Path:
    """Build a TensorRT 10 engine from a spleen_utils ONNX file; writes ``out`` and ``out.json``.

    ``options`` are :class:`EngineOptions`' fields (the profile, fp16, the workspace). The sidecar
    JSON holds the ONNX metadata plus the engine's profile and precision.
    """
    onnx_path, out, opts = Path(onnx_path), Path(out), EngineOptions(**options)
    meta = read_onnx_metadata(onnx_path)  # also proves the file is ours
    recipe = Recipe.from_dict(meta["recipe"])
    shapes = opts.shapes(recipe)
    cmd = trtexec_command(onnx_path, out, recipe, **options)
    ok, reason = tensorrt_available()
    if not ok:
        what = "TensorRT is not installed here" if "not installed" in reason else f"TensorRT cannot run here ({reason})"
        raise SpleenError(
            f"{what}; build the engine on a machine with an NVIDIA GPU and TensorRT 10, where the equivalent trtexec "
            f"command is: {cmd} (then write {engine_sidecar(out).name} with spleen_utils.artifact.write_engine_sidecar)."
        )
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SpleenError(f"{onnx_path}: TensorRT's ONNX parser rejected the model ({errors[:500]}).")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    if opts.fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise SpleenError(f"this TensorRT ({trt.__version__}) has no FP16 builder flag; build with fp16=False.")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes[0], shapes[1], shapes[2])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SpleenError(f"TensorRT could not build an engine from {onnx_path} (see its log above).")
    with atomic_path(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    write_engine_sidecar(
        out,
        meta,
        shapes,
        precision="fp16" if opts.fp16 else "fp32",
        extra={
            "tensorrt": trt.__version__,
            "gpu": torch.cuda.get_device_name(0),
            "source_onnx_sha256": file_sha256(onnx_path),
            "workspace_gb": opts.workspace_gb,
            "build_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return out


