"""Network backends behind one interface, so the pipeline never knows which runtime it drives.

A backend is a callable ``backend(x) -> logits``: ``x`` is a float32 ``torch.Tensor`` of shape
``(N, 1, X, Y, Z)`` (intensities already windowed to [0, 1]); it returns float32 logits
``(N, C, X, Y, Z)`` on the same device as ``x``. It also carries ``name``, ``device``,
``precision``, ``recipe`` (the :class:`~spleen_utils.config.Recipe` read from the artifact) and
``meta`` (the artifact's own description).

The ONNX Runtime backend also takes and returns numpy arrays (``array_api = "numpy"``): with an
ONNX file, ``spleen-seg predict`` runs without importing PyTorch or MONAI (their import is most
of a single prediction's start-up). This module therefore imports torch only inside the torch
and TensorRT backends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import Recipe
from .errors import SpleenError

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    import torch

# the contract of the three model files (names, metadata, validation) is the artifact module's
from .artifact import INPUT_NAME, OUTPUT_NAME, file_sha256, parse_onnx_metadata, read_engine_sidecar, spatial_multiple


class Device:
    """Where a backend runs, without importing torch: ``type`` (``cpu``/``cuda``) and ``index``.

    Compares equal to the ``torch.device`` of the same name, and ``str()`` gives that name, so
    ``torch.device(str(d))`` turns it into one.
    """

    __slots__ = ("type", "index")

    def __init__(self, type: str, index: int | None = None):
        self.type, self.index = str(type), (None if index is None else int(index))

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Device, str)) or type(other).__name__ == "device":
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))


class Backend(Protocol):
    name: str
    device: Any  # torch.device, or Device for the ONNX Runtime backend
    precision: str
    recipe: Recipe
    meta: dict[str, Any]

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor": ...


class TorchBackend:
    """PyTorch on CPU or CUDA; ``precision`` fp32, or ``amp`` (fp16 on CUDA, bf16 on CPU)."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "auto", precision: str = "fp32"):
        from .model import cpu_supports_bf16, load_model, resolve_device

        self.device = resolve_device(device)
        self.model, self.recipe, self.meta = load_model(model_path, self.device)
        if precision not in ("fp32", "amp", "bf16", "fp16"):
            raise SpleenError(f"unknown precision {precision!r} for the torch backend; use fp32 or amp.")
        if precision == "amp":
            precision = "fp16" if self.device.type == "cuda" else "bf16"
        if precision == "bf16" and self.device.type == "cpu" and not cpu_supports_bf16():
            precision = "fp32"  # no native bf16 here: emulating it would only be slower
        self.precision = precision

    def autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        src = x.device
        with torch.no_grad(), self.autocast():
            y = self.model(x.to(self.device, non_blocking=True))
        return y.float().to(src)


class OnnxBackend:
    """ONNX Runtime on a spleen_utils ONNX file (see :mod:`spleen_utils.export`).

    ``device``: ``auto`` takes ONNX Runtime's CUDA execution provider when this onnxruntime
    build has it (``onnxruntime-gpu``), else the CPU; ``cuda`` insists on it; ``cpu`` never uses
    it. Threads are ONNX Runtime's defaults (one intra-op thread per physical core). The file is
    fp32, so ``precision`` is ``fp32``; ``amp`` is accepted and also means fp32 here.
    Inputs and outputs pass through host memory (numpy), also with the CUDA provider: a numpy
    input gives a numpy output, a torch tensor a torch tensor. Opening and running it imports
    neither torch nor MONAI.
    """

    name = "onnx"
    array_api = "numpy"

    def __init__(self, model_path: str | Path, device: str = "auto", precision: str = "fp32"):
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.exists():
            raise SpleenError(f"{model_path}: no such model file.")
        if precision not in ("fp32", "amp"):
            raise SpleenError(f"the onnx backend runs the fp32 model as it is; precision {precision!r} is not available (use fp32).")
        self.precision = "fp32"
        device = "auto" if device in (None, "") else str(device)
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device.startswith("cuda") and not has_cuda:
            raise SpleenError(
                "--device cuda was asked for, but this ONNX Runtime has no CUDA execution provider "
                "(install onnxruntime-gpu); use --device cpu or auto."
            )
        if device != "auto" and device != "cpu" and not device.startswith("cuda"):
            raise SpleenError(f"unknown device {device!r}; use auto, cpu or cuda.")
        providers: list[Any] = ["CPUExecutionProvider"]
        if has_cuda and device != "cpu":
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; ORT's warnings are about graph rewrites
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile ... from the C++ side
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise SpleenError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {msg}).") from None
        self.meta = parse_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, model_path)
        self.path = model_path
        self.exported_from: Path | None = None  # the checkpoint, when opened for it (onnx_twin)
        self.recipe = Recipe.from_model(self.meta.get("recipe"), str(model_path))
        self.providers = self.session.get_providers()
        if self.providers[0] == "CUDAExecutionProvider":
            opts = self.session.get_provider_options().get("CUDAExecutionProvider", {})
            self.device = Device("cuda", int(opts.get("device_id", 0)))
        else:
            if device.startswith("cuda"):
                raise SpleenError("ONNX Runtime could not start its CUDA execution provider (see its log); use --device cpu.")
            self.device = Device("cpu")
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
            raise SpleenError(f"{model_path}: expected tensors {INPUT_NAME!r} -> {OUTPUT_NAME!r}, found {names_in} -> {names_out}.")
        self._input, self._output = INPUT_NAME, OUTPUT_NAME
        self._multiple = spatial_multiple(self.recipe)

    def __call__(self, x):
        import numpy as np

        _check_input(x, self._multiple)
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x, dtype=np.float32)
            return self.session.run([self._output], {self._input: a})[0]
        import torch

        src = x.device
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()
        y = self.session.run([self._output], {self._input: a})[0]
        return torch.from_numpy(y).to(src)


def _check_input(x, multiple: int) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise SpleenError(f"the network takes (N, 1, X, Y, Z) input; got shape {tuple(x.shape)}.")
    if any(int(s) % multiple for s in x.shape[2:]):
        raise SpleenError(f"the spatial size {tuple(x.shape[2:])} is not a multiple of {multiple} on every axis.")


class TensorRTBackend:
    """A TensorRT 10 engine on a CUDA GPU; built by :func:`spleen_utils.export.build_trt_engine`.

    The recipe comes from the engine's sidecar ``<engine>.json``. Inputs and outputs are torch CUDA
    tensors handed to TensorRT by address, and the engine runs on PyTorch's current CUDA stream:
    no host copies, any shape inside the engine's optimisation profile. ``precision`` is the one
    the engine was built with (``fp16`` or ``fp32``). One call at a time per backend (a lock).
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, device: str = "cuda"):
        import torch

        from .export import tensorrt_available
        from .model import resolve_device

        engine_path = Path(engine_path)
        if not engine_path.exists():
            raise SpleenError(f"{engine_path}: no such model file.")
        ok, reason = tensorrt_available()
        if not ok:
            raise SpleenError(f"{engine_path}: the tensorrt backend cannot run here: {reason}.")
        self.device = resolve_device("cuda" if device in (None, "auto") else device)
        if self.device.type != "cuda":
            raise SpleenError("TensorRT engines run only on a CUDA GPU; use --device cuda or auto.")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.meta = read_engine_sidecar(engine_path)
        self.recipe = Recipe.from_model(self.meta.get("recipe"), str(engine_path))
        self.precision = str(self.meta.get("engine", {}).get("precision", "fp32"))
        self._multiple = spatial_multiple(self.recipe)
        self._input, self._output = INPUT_NAME, OUTPUT_NAME

        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise SpleenError(
                    f"{engine_path}: TensorRT {trt.__version__} cannot load this engine (an engine only runs with the "
                    "TensorRT version and GPU model it was built with); rebuild it here."
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise SpleenError(f"{engine_path}: expected tensors {INPUT_NAME!r} and {OUTPUT_NAME!r}, found {names}.")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        if hasattr(trt.DataType, "BF16"):
            dtypes[trt.DataType.BF16] = torch.bfloat16
        try:
            self._in_dtype = dtypes[self.engine.get_tensor_dtype(INPUT_NAME)]
            self._out_dtype = dtypes[self.engine.get_tensor_dtype(OUTPUT_NAME)]
        except KeyError as e:
            raise SpleenError(f"{engine_path}: unsupported engine I/O data type {e}.") from None
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.profile = (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
        self._lock = threading.Lock()

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        _check_input(x, self._multiple)
        lo, hi = self.profile
        shape = tuple(int(s) for s in x.shape)
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise SpleenError(f"input shape {shape} is outside the engine's optimisation profile {lo} .. {hi}; rebuild the engine for it.")
        src = x.device
        xin = x.detach().to(self.device, self._in_dtype).contiguous()
        with self._lock, torch.cuda.device(self.device):
            if not self.context.set_input_shape(self._input, shape):
                raise SpleenError(f"TensorRT refused the input shape {shape}.")
            out = torch.empty(tuple(self.context.get_tensor_shape(self._output)), dtype=self._out_dtype, device=self.device)
            self.context.set_tensor_address(self._input, xin.data_ptr())
            self.context.set_tensor_address(self._output, out.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise SpleenError("TensorRT failed to run the engine (see its log).")
        # later work on the same stream (and the caching allocator) is ordered after the engine
        return out.float().to(src)


# ----------------------------------------------------------------------------------------------
# making the torch backend faster on a CPU (the Predictor applies it)


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold every eval-mode batch norm that follows a convolution into it (MONAI ``Convolution``
    blocks: ``conv`` then ``adn.N``); returns how many. The same function, up to rounding, with
    one memory pass less per layer (the ONNX exporter does the same)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for mod in model.modules():
        conv, adn = getattr(mod, "conv", None), getattr(mod, "adn", None)
        bn = getattr(adn, "N", None) if adn is not None else None
        if isinstance(conv, torch.nn.modules.conv._ConvNd) and isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            if bn.training or conv.training or not bn.track_running_stats:
                continue
            mod.conv = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, torch.nn.modules.conv._ConvTransposeNd))
            adn.N = torch.nn.Identity()
            n += 1
    return n


def optimize_torch_backend(backend: Backend) -> list[str]:
    """Make a CPU torch backend's network faster in place; returns what was done.

    * batch norms folded into the convolutions (:func:`fold_batch_norms`);
    * weights stored channels-last (NDHWC): oneDNN runs this UNet's 3-D convolutions 1.3-1.5x
      faster so on CPU, in fp32 and bf16 (measured on a 2-core AVX512-BF16 CPU);
    * for bf16 autocast, the weights stored in bf16 (the casts autocast would repeat at every
      call, ~7%; the same logits).

    The logits are those of the original network up to rounding. Other backends (ONNX Runtime,
    TensorRT) and CUDA are left as they are.
    """
    model = getattr(backend, "model", None)
    device = getattr(backend, "device", None)
    if getattr(backend, "name", "") != "torch" or model is None or device is None or device.type != "cpu":
        return []
    import torch

    if not isinstance(model, torch.nn.Module):
        return []
    done = []
    if not model.training and fold_batch_norms(model):
        done.append("batch norms folded")
    model.to(memory_format=torch.channels_last_3d)
    done.append("channels_last_3d")
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if getattr(backend, "precision", "") == "bf16" and not has_bn and not model.training:
        # autocast would cast every weight to bf16 at every call; storing them so gives the
        # same logits (measured: identical) without the casts
        model.to(torch.bfloat16)
        done.append("bf16 weights")
    return done


def available_backends() -> dict[str, str]:
    """Each backend's name mapped to ``"available"`` or the reason it is not (never raises)."""
    from .export import tensorrt_available

    out = {"torch": "available"}
    try:
        import onnxruntime  # noqa: F401

        out["onnx"] = "available"
    except Exception as e:
        out["onnx"] = f"onnxruntime is not installed here ({type(e).__name__})"
    ok, reason = tensorrt_available()
    out["tensorrt"] = "available" if ok else reason
    return out


BACKENDS = ("auto", "torch", "onnx", "tensorrt")
SUFFIXES = {".pt": "torch", ".pth": "torch", ".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt"}


def _gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU, found without importing torch (its CUDA
    runtime takes seconds to load)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.exists("/dev/nvidia0") or (os.path.isdir(gpus) and bool(os.listdir(gpus)))


def onnx_twin(checkpoint: str | Path, device: str = "auto", precision: str = "fp32") -> OnnxBackend | None:
    """The checkpoint's own ONNX export, opened, when the default may run it instead of torch.

    ``spleen-seg export`` writes ``model.onnx`` beside ``best_model.pt`` and stores the
    checkpoint's SHA-256 in it. When that file (``model.onnx`` or ``<checkpoint stem>.onnx``)
    names exactly this checkpoint, ONNX Runtime computes the same network in fp32 (agreement
    1.000 with the tutorial's masks in ``spleen-seg bench``) without importing torch or MONAI:
    a single prediction starts in about 2 s instead of 7. It is used for fp32 on the CPU
    (``device`` ``cpu``, or ``auto`` on a machine without an NVIDIA GPU, where torch would take
    CUDA). None otherwise: no such file, another checkpoint's file (an export older than the
    last training), no onnxruntime, or another precision or device. ``--backend torch`` opts out.
    """
    checkpoint = Path(checkpoint)
    if precision != "fp32" or checkpoint.suffix.lower() not in (".pt", ".pth") or not checkpoint.is_file():
        return None
    if not (device == "cpu" or (device in ("auto", None, "") and not _gpu_visible())):
        return None
    candidates = [p for p in dict.fromkeys([checkpoint.with_suffix(".onnx"), checkpoint.parent / "model.onnx"]) if p.is_file()]
    if not candidates or importlib.util.find_spec("onnxruntime") is None:
        return None
    digest = file_sha256(checkpoint)
    for path in candidates:
        try:
            twin = OnnxBackend(path, device="cpu")
        except SpleenError:  # unreadable, or not ours: the checkpoint itself still is
            continue
        if twin.meta.get("source_checkpoint_sha256") == digest:
            twin.exported_from = checkpoint
            return twin
    return None


def open_backend(model_path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "fp32") -> Backend:
    """Open ``model_path`` with the named backend (``auto``: by suffix, .pt / .onnx / .engine;
    a checkpoint with its own ONNX export beside it runs that export, see :func:`onnx_twin`)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise SpleenError(f"{model_path}: no such model file.")
    if backend == "auto":
        twin = onnx_twin(model_path, device, precision)
        if twin is not None:
            return twin
        backend = SUFFIXES.get(model_path.suffix.lower(), "")
        if not backend and str(model_path).endswith((".nii", ".nii.gz")):
            raise SpleenError(f"{model_path}: is a NIfTI image, not a model file; --model takes best_model.pt, model.onnx or model.engine.")
        if not backend:
            raise SpleenError(f"{model_path}: cannot tell the backend from the suffix; pass --backend torch|onnx|tensorrt.")
    if backend == "torch":
        return TorchBackend(model_path, device=device, precision=precision)
    if backend == "onnx":
        return OnnxBackend(model_path, device=device, precision=precision)
    if backend == "tensorrt":
        return TensorRTBackend(model_path, device=device)
    raise SpleenError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
