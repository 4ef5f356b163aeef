"""One :class:`Predictor` for every backend: preprocess, run the network, back to the input's grid.

The mask a predictor writes has exactly the shape and affine of the image it was given, whatever
that image's orientation, spacing or voxel type: the preprocessing (HU window, crop to the body,
orientation to RAS, resampling to the recipe's spacing) is undone step by step.

The default path, and why (each choice measured by :mod:`spleen_utils.bench`)
------------------------------------------------------------------------------
The recipe is the MONAI spleen tutorial's; the default path computes the same thing with less
work. ``spleen-seg bench`` runs it side by side with a faithful copy of the tutorial's pipeline
(:func:`spleen_utils.bench.baseline_predict`) and reports the speed ratio and the Dice agreement
of the two masks.

1. **Preprocessing on plain arrays, with MONAI's geometry** (:mod:`spleen_utils.preprocess`). The same steps as
   :func:`spleen_utils.transforms.inference_transforms` (``ScaleIntensityRanged``,
   ``CropForegroundd``, ``Orientationd``, ``Spacingd``) with the same output grid, computed by
   numpy ports of MONAI's own geometry functions (``zoom_affine``, ``compute_shape_offset``;
   tests hold them equal) and nibabel's orientation code, but done on plain numpy arrays: the foreground box is found on the raw HU values
   and only the box is windowed; reorienting is a flip/transpose; resampling is *separable*
   linear interpolation (three 1-D passes; for an image whose affine has orthogonal axes the
   resampling matrix is diagonal, so this is exactly the trilinear, border-padded
   interpolation ``Spacingd`` does with ``grid_sample``). An image with a sheared affine (rare)
   takes MONAI's generic transforms instead (``Invertd`` for the way back).
2. **The tutorial's windows, nothing less** (``window="auto"``). A volume that fits in the
   ROI (160^3) runs as one window, zero-padded symmetrically to the ROI exactly as MONAI's
   sliding window pads it (and to a multiple of 16, the UNet's four stride-2 levels); a larger
   one runs through MONAI's ``sliding_window_inference`` with the recipe's ROI, batch and
   overlap. Both are the tutorial's windows, so the masks differ from its masks by precision
   alone. ``window="whole"`` runs any volume as one window (padded to at least the ROI) and
   skips the 2-4x overlap redundancy of larger volumes, but it changes the masks: with the
   patch-trained quick-profile models it was measured at Dice 0.98 against the sliding
   window's masks (closer to the labels, not further) when the volume exceeds the ROI, and a
   tight window without the ROI's padding fails outright (quick-profile checkpoint, synthetic
   validation case spleen_12, 96x75x40 voxels: Dice 0.20 against the tutorial's window when
   padded to multiples of 16, 0.991 when padded to 64, 0.9996 at 96, 1.000 at 128 and 160).
   Volumes above ``max_window_voxels`` (and shapes a TensorRT
   engine's profile does not accept, or a GPU that runs out of memory) use the sliding window;
   ``window="sliding"`` always does.
3. **Precision** ``auto`` (:meth:`Predictor.from_path`'s default) is **fp32** on every device
   (:data:`DEFAULT_PRECISION`): the default path must give the tutorial's masks (Dice >= 0.99
   against :func:`spleen_utils.bench.baseline_predict` on every benchmark case). bf16 autocast
   was measured at Dice 0.974 against them on a synthetic test case (a CPU with AVX512-BF16;
   torch bf16 vs fp32 logits agreed at 0.989 in the project's own record): the spleen's border
   sits where the logit margin is small, and bf16's 8-bit mantissa moves it. fp32 through torch
   and through ONNX Runtime agree with the tutorial at Dice 1.000 (``spleen-seg bench``'s
   agreement table). ``bf16``, ``fp16`` and ``amp`` (bf16 on CPU, fp16 on CUDA) remain, by
   explicit choice. ONNX files run fp32 and TensorRT engines the precision they were built with.
4. **Without torch for ONNX.** Preprocessing, the way back, MONAI's sliding window
   (:func:`sliding_window`) and the component filter (``scipy.ndimage``) are numpy, so with an
   ONNX file ``spleen-seg predict`` imports neither torch nor MONAI: their import (~2-3 s) was
   most of a single prediction's start-up. The torch backend imports them when it opens.
   A checkpoint whose own ONNX export lies beside it (``spleen-seg export`` writes
   ``model.onnx`` next to ``best_model.pt``, with the checkpoint's SHA-256 inside) runs that
   export on the CPU in fp32 (:func:`spleen_utils.backends.onnx_twin`): the same masks as
   torch fp32 (agreement 1.000 in the benchmark), a process that starts in ~2 s instead of
   ~7 s. A stale export (another checkpoint's digest) is never used; ``backend="torch"``
   (``--backend torch``) opts out, and other precisions or a GPU keep torch.
   Across a folder, the next case is read and the previous mask written in two threads while
   the network runs.
5. **Inversion of one channel.** For the two-label recipe the way back resamples the logit
   margin ``spleen - background`` instead of both logits: resampling is linear, so the sign of
   the resampled margin is exactly the argmax of the resampled logits, at half the cost. It
   resamples only onto the foreground box of the input (outside it the mask is 0, as with
   ``Invertd``, which pads the crop back with zeros); the filter that keeps one connected component
   (:func:`spleen_utils.postprocess.keep_one_component`: the largest, or among comparable ones the one with the highest mean
   margin) runs on the bounding box of the mask only.
6. **Channels-last** (NDHWC) weights for the torch backend on CPU, batch norms folded into the
   convolutions: oneDNN runs the 3-D convolutions 1.3-1.5x faster channels-last (fp32 and bf16);
   folding saves one memory pass per layer (5-15% here); with bf16 the weights are stored in
   bf16 rather than cast by autocast at every call (~7%, identical logits). Threads: PyTorch's
   default (one per core), left to the caller: on a 2-core machine whose cores other processes
   also use, one thread was measured ~2x faster than two for both pipelines (each OpenMP region
   waits for the preempted second thread), so ``spleen-seg bench --threads`` sets it for both.
   ``torch.compile`` was measured and left out: 81 s of compilation for a network ~10% faster
   at one input shape, and every new volume shape compiles again.
7. Resampling indexes with ``np.take`` along one axis at a time (for torch, ``index_select``
   was ~10x slower than advanced indexing on the innermost axis).

An image with no voxel above the HU window's low end has no foreground: its mask is empty.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .artifact import spatial_multiple
from .backends import Backend, open_backend, optimize_torch_backend
from .errors import DataError, NotAnImageError, SpleenError
from .postprocess import keep_one_component
from .preprocess import prepare, resampled_shape, restore

if TYPE_CHECKING:  # annotations only: torch, MONAI and nibabel are imported where they are used
    from .io import Volume

#: the largest volume (voxels, after cropping and resampling, padded) that ``window="auto"`` runs
#: as one window; about 3 GB of activations in fp32 for the spleen UNet (measured: ~1.2 GB for
#: 7.8 M voxels). Larger volumes use the sliding window.
DEFAULT_MAX_WINDOW_VOXELS = 20_000_000
WINDOWS = ("auto", "whole", "sliding")
PRECISIONS = ("auto", "fp32", "amp", "bf16", "fp16")
#: what ``precision="auto"`` means: fp32 on every device (see the module docstring, point 3)
DEFAULT_PRECISION = "fp32"


# ----------------------------------------------------------------------------------------------
# windows


def _padded_shape(shape, m: int, minimum) -> tuple[int, ...]:
    """Each axis: at least ``minimum`` (the ROI), rounded up to a multiple of ``m``."""
    return tuple(int(math.ceil(max(int(n), int(lo)) / m) * m) for n, lo in zip(shape, minimum))


def _pad_to_multiple(x: np.ndarray, m: int, minimum=(0, 0, 0)) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad ``(X, Y, Z)`` symmetrically, as MONAI's sliding window pads an image smaller than
    its ROI, to at least ``minimum`` and a multiple of ``m`` per axis."""
    pads, keep = [], []
    for n, size in zip(x.shape, _padded_shape(x.shape, m, minimum)):
        total = size - n
        lo = total // 2
        pads.append((lo, total - lo))
        keep.append(slice(lo, lo + n))
    if any(v for p in pads for v in p):
        x = np.pad(x, pads)
    return x, tuple(keep)


def scan_slices(image_size, roi, overlap: float) -> list[tuple[slice, ...]]:
    """The windows of MONAI's ``sliding_window_inference`` over an ``image_size`` at least ``roi``
    on every axis (``_get_scan_interval`` and ``dense_patch_slices``), in MONAI's order."""
    starts = []
    for n, r in zip(image_size, roi):
        n, r = int(n), int(r)
        step = r if r == n else max(int(r * (1 - overlap)), 1)
        count = next((d for d in range(int(math.ceil(n / step))) if d * step + r >= n), 0) + 1
        starts.append([i * step - max(i * step + r - n, 0) for i in range(count)])
    grid = np.asarray([g.ravel() for g in np.meshgrid(*starts, indexing="ij")]).T
    return [tuple(slice(int(s), int(s) + int(r)) for s, r in zip(row, roi)) for row in grid]


def sliding_window(image: np.ndarray, roi, sw_batch_size: int, predictor, overlap: float) -> np.ndarray:
    """MONAI's ``sliding_window_inference`` (constant blending, zero padding) on numpy arrays.

    ``image`` is ``(1, 1, X, Y, Z)``; returns ``(1, C, X, Y, Z)`` float32. The same windows in the
    same order, summed and divided by their count as MONAI does (a test holds the two equal),
    for backends that run without torch (ONNX Runtime).
    """
    shape = tuple(int(v) for v in image.shape[2:])
    pads = [((r - n) // 2, (r - n) - (r - n) // 2) if r > n else (0, 0) for n, r in zip(shape, roi)]
    if any(a or b for a, b in pads):
        image = np.pad(image, [(0, 0), (0, 0), *pads])
    size = tuple(int(v) for v in image.shape[2:])
    windows = scan_slices(size, roi, overlap)
    out = count = None
    for g in range(0, len(windows), sw_batch_size):
        group = windows[g : g + sw_batch_size]
        batch = np.concatenate([image[(slice(None), slice(None), *w)] for w in group])
        y = np.asarray(predictor(batch), dtype=np.float32)
        if out is None:
            out = np.zeros((1, y.shape[1], *size), dtype=np.float32)
            count = np.zeros((1, 1, *size), dtype=np.float32)
        for j, w in enumerate(group):
            out[(slice(None), slice(None), *w)] += y[j : j + 1]
            count[(slice(None), slice(None), *w)] += 1.0
    out /= count
    keep = tuple(slice(a, a + n) for (a, _), n in zip(pads, shape))
    return np.ascontiguousarray(out[(slice(None), slice(None), *keep)])


def _plain(x):
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _to_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (an array, a tensor or a MONAI MetaTensor, on any device)."""
    if isinstance(x, np.ndarray):
        return x
    import torch  # x is a tensor: torch is already imported

    x = _plain(x).detach()
    if x.dtype in (torch.bfloat16, torch.float16):  # half-precision logits: numpy has no bf16
        x = x.float()
    return x.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """Segment CT volumes with any backend (see :mod:`spleen_utils.backends`).

    ``window``: ``auto`` (one window over the whole volume when it has at most
    ``max_window_voxels`` voxels and the backend accepts its shape, else the sliding window),
    ``whole`` or ``sliding`` (MONAI's sliding window with ``roi``, ``sw_batch_size`` and
    ``overlap``, by default the recipe's). ``preprocess``: ``fast`` (the default path, see the
    module docstring) or ``monai`` (the recipe's MONAI transforms and ``Invertd``).
    ``optimize``: fold the batch norms and store the weights channels-last for a CPU torch
    backend (:func:`optimize_torch_backend`; this changes the backend's model in place).
    """

    def __init__(
        self,
        backend: Backend,
        lcc: bool = True,
        roi: tuple[int, int, int] | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        progress: bool = False,
        window: str = "auto",
        max_window_voxels: int = DEFAULT_MAX_WINDOW_VOXELS,
        preprocess: str = "fast",
        optimize: bool = True,
    ):
        if window not in WINDOWS:
            raise SpleenError(f"unknown window {window!r}; use one of {', '.join(WINDOWS)}.")
        if preprocess not in ("fast", "monai"):
            raise SpleenError(f"unknown preprocess {preprocess!r}; use fast or monai.")
        self.backend = backend
        self.recipe = backend.recipe
        self.lcc = lcc
        self.roi = tuple(int(v) for v in (roi or self.recipe.sw_roi))
        self.sw_batch_size = int(sw_batch_size or self.recipe.sw_batch_size)
        self.overlap = float(self.recipe.overlap if overlap is None else overlap)
        self.progress = progress
        self.window = window
        self.max_window_voxels = int(max_window_voxels)
        self.preprocess = preprocess
        self.multiple = spatial_multiple(self.recipe)
        self.optimizations = optimize_torch_backend(backend) if optimize else []
        self._pre = None
        self._invert = None

    @classmethod
    def from_path(
        cls, model_path: str | Path, backend: str = "auto", device: str = "auto", precision: str = "auto", **kwargs: Any
    ) -> "Predictor":
        """Open a model file (``.pt``, ``.onnx``, ``.engine``) and build a predictor on it.

        ``precision`` (:data:`PRECISIONS`): ``auto`` (the default) is :data:`DEFAULT_PRECISION`,
        fp32, the precision of the tutorial's masks (see the module docstring, point 3);
        ``bf16`` / ``fp16`` / ``amp`` (bf16 on CPU, fp16 on CUDA) run the torch backend under
        autocast when asked for. ONNX files run fp32 and TensorRT engines the precision they
        were built with. ``backend="auto"`` with a checkpoint runs its own ONNX export when one
        lies beside it (:func:`spleen_utils.backends.onnx_twin`).
        """
        if precision not in PRECISIONS:
            raise SpleenError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
        if precision == "auto":
            precision = DEFAULT_PRECISION
        return cls(open_backend(model_path, backend=backend, device=device, precision=precision), **kwargs)

    @property
    def description(self) -> str:
        b = self.backend
        twin = getattr(b, "exported_from", None)
        where = f"; {b.path.name}, the export of {twin.name}" if twin is not None else ""
        return f"{b.name} ({b.precision}, {b.device}{where})"

    @property
    def training_note(self) -> str | None:
        """One sentence when the model is a teaching model (trained mostly on generated CT), else None."""
        meta = getattr(self.backend, "meta", None) or {}
        source = meta.get("source_checkpoint") if isinstance(meta.get("source_checkpoint"), dict) else meta
        data, profile = source.get("training_data"), source.get("profile")
        if data and "generated CT" in str(data):
            return f"this model was trained on {data}: a teaching model, not a clinical one."
        if not data and profile == "quick":
            return "this model comes from the quick profile (generated CT): a teaching model, not a clinical one."
        return None

    # ---- MONAI's transforms (the generic path)
    @property
    def pre(self):
        if self._pre is None:
            from .transforms import inference_transforms

            self._pre = inference_transforms(self.recipe)
        return self._pre

    @property
    def invert(self):
        if self._invert is None:
            from monai.transforms import Invertd

            self._invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False, to_tensor=True)
        return self._invert

    # ---- the network
    def _whole_fits(self, shape: tuple[int, ...]) -> bool:
        if self.window == "sliding":
            return False
        padded = _padded_shape(shape, self.multiple, self.roi)
        if self.window == "whole":
            return True
        if any(int(n) > int(r) for n, r in zip(shape, self.roi)):
            return False  # larger than the ROI: the tutorial's overlapping windows (see the module docstring)
        if math.prod(padded) > self.max_window_voxels:
            return False
        profile = getattr(self.backend, "profile", None)  # a TensorRT engine accepts only its profile's shapes
        if profile is not None:
            lo, hi = profile
            full = (1, 1, *padded)
            return all(a <= s <= b for s, a, b in zip(full, lo, hi))
        return True

    def window_plan(self, shape: tuple[int, ...]) -> str:
        """``"whole"`` or ``"sliding"``: how a preprocessed volume of ``shape`` is run."""
        return "whole" if self._whole_fits(tuple(shape)) else "sliding"

    @property
    def numpy_backend(self) -> bool:
        """Whether the backend takes numpy arrays (ONNX Runtime): then nothing here imports torch."""
        return getattr(self.backend, "array_api", "torch") == "numpy"

    def logits(self, image) -> np.ndarray:
        """Logits ``(C, X, Y, Z)`` (float32 numpy) of a preprocessed ``(1, X, Y, Z)`` image (numpy
        or tensor), one window or MONAI's sliding window."""
        image = np.ascontiguousarray(_to_numpy(image), dtype=np.float32)
        if self.window_plan(tuple(image.shape[1:])) == "whole":
            x, keep = _pad_to_multiple(image[0], self.multiple, self.roi)
            x = np.ascontiguousarray(x[None, None])
            if self.numpy_backend:
                return np.asarray(self.backend(x))[0][(slice(None), *keep)]
            import torch

            try:
                with torch.no_grad():
                    out = self.backend(torch.from_numpy(x))
                return _to_numpy(out[0][(slice(None), *keep)])
            except torch.OutOfMemoryError:  # a GPU too small for this volume: windows after all
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if self.numpy_backend:
            return sliding_window(image[None], self.roi, self.sw_batch_size, self.backend, self.overlap)[0]
        import torch
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            out = sliding_window_inference(
                torch.from_numpy(image[None]),
                roi_size=self.roi,
                sw_batch_size=self.sw_batch_size,
                predictor=self.backend,
                overlap=self.overlap,
                mode="constant",
                sw_device=self.backend.device,
                device="cpu",
                progress=self.progress,
            )
        return _to_numpy(out[0])

    @staticmethod
    def _margin(logits: np.ndarray) -> np.ndarray:
        if logits.shape[0] == 2:
            return logits[1:2] - logits[0:1]  # the margin: > 0 where spleen wins
        return logits

    @staticmethod
    def _label(values: np.ndarray) -> np.ndarray:
        """``(C, ...)`` margin (C = 1) or logits -> uint8 label map ``(...)``."""
        values = np.asarray(values)
        if values.shape[0] == 1:
            return (values[0] > 0).astype(np.uint8)
        return values.argmax(axis=0).astype(np.uint8)

    # ---- one volume
    def predict_volume(self, vol: Volume) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 label map on ``vol``'s grid, and the time of each stage in seconds
        (``preprocess_s``, ``inference_s``: the network, ``postprocess_s``: back to the input's
        grid, argmax and the one component kept)."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        prep = prepare(vol, self.recipe) if self.preprocess == "fast" else "generic"
        if prep is None:  # nothing above the HU window's low end: no body, no spleen
            t["preprocess_s"] = time.perf_counter() - t0
            t["inference_s"] = t["postprocess_s"] = 0.0
            return np.zeros(vol.shape, dtype=np.uint8), t
        if isinstance(prep, str):
            return self._predict_generic(vol, t, t0)
        t["preprocess_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits = self.logits(prep.image[None])
        t["inference_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        margin = self._margin(logits.astype(np.float32, copy=False))
        if margin.shape[0] == 1:
            *box, values = restore(np.ascontiguousarray(margin[0]), prep)
            label_box = (values > 0).astype(np.uint8)
        else:
            restored = [restore(np.ascontiguousarray(c), prep) for c in margin]
            box = list(restored[0][:3])
            label_box = np.stack([r[3] for r in restored]).argmax(axis=0).astype(np.uint8)
        if self.lcc:
            label_box = keep_one_component(label_box, values if margin.shape[0] == 1 else None)
        mask = np.zeros(vol.shape, dtype=np.uint8)
        mask[tuple(box)] = label_box
        t["postprocess_s"] = time.perf_counter() - t0
        return mask, t

    def _predict_generic(self, vol: Volume, t: dict[str, float], t0: float) -> tuple[np.ndarray, dict[str, float]]:
        """MONAI's transforms and ``Invertd`` (any affine, including sheared ones)."""
        import torch
        from monai.data import MetaTensor

        resampled_shape(vol, self.recipe, str(vol.path) if vol.path is not None else "image")
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None], affine=torch.as_tensor(vol.affine))
        data = self.pre({"image": image})
        t["preprocess_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits = self.logits(data["image"])
        t["inference_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pred = self._margin(logits.astype(np.float32, copy=False))
        data["pred"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(pred)), meta=data["image"].meta)
        inverted = _to_numpy(self.invert(data)["pred"])
        label = self._label(inverted)
        if self.lcc:
            label = keep_one_component(label, inverted[0] if inverted.shape[0] == 1 else None)
        mask = np.asarray(label, dtype=np.uint8)
        t["postprocess_s"] = time.perf_counter() - t0
        if mask.shape != vol.shape:  # a bug, never the user's fault
            raise RuntimeError(f"inverted mask {mask.shape} does not match the input grid {vol.shape}")
        return mask, t

    # ---- files: read, segment, write (predict_path overlaps the three across a folder)
    def _read(self, input_path: str | Path, output_path: str | Path, series_uid: str | None = None):
        """``(volume, DICOM series or None, seconds)`` of one input, refused when it holds a label map."""
        from .dicom import is_dicom_input, is_seg_name, read_series
        from .io import is_label_array, load_nifti

        t0 = time.perf_counter()
        series = read_series(input_path, series_uid=series_uid) if is_dicom_input(input_path) else None
        if series is None and is_seg_name(output_path):
            raise DataError(f"{output_path}: a DICOM SEG needs a DICOM series as input (a folder or zip); for a NIfTI input write .nii.gz.")
        vol = series.volume if series is not None else load_nifti(input_path)
        if is_label_array(vol.array):
            raise NotAnImageError(f"{input_path}: holds a label map (whole numbers from {int(vol.array.min())} to "
                            f"{int(vol.array.max())}), not a CT in Hounsfield units; give the image, not its mask.")
        return vol, series, time.perf_counter() - t0

    def _write(self, mask: np.ndarray, vol: Volume, series, output_path: str | Path) -> tuple[float, float]:
        """Write one mask (NIfTI, or DICOM SEG for a series and a ``.dcm`` output); ``(seconds, end time)``."""
        from .dicom import is_seg_name, write_seg
        from .io import save_mask

        t1 = time.perf_counter()
        if series is not None and is_seg_name(output_path):
            write_seg(mask, series, output_path, parameters={"backend": self.description})
        else:
            save_mask(mask, vol, output_path)
        t2 = time.perf_counter()
        return t2 - t1, t2

    def _record(self, input_path, output_path, vol: Volume, series, mask: np.ndarray, t: dict[str, float]) -> dict[str, Any]:
        return {
            "input": str(input_path),
            "output": str(output_path),
            "shape": list(vol.shape),
            "spacing_mm": [round(s, 4) for s in vol.spacing],
            "orientation": vol.axcodes,
            "spleen_voxels": int(mask.sum()),
            "spleen_ml": float(mask.sum()) * vol.voxel_ml,
            "backend": self.description,
            "timings": t,
            **({"series": series.series.key, "slices": len(series.headers)} if series is not None else {}),
        }

    def predict_file(self, input_path: str | Path, output_path: str | Path, series_uid: str | None = None) -> dict[str, Any]:
        """Segment one NIfTI file or DICOM series (folder or zip) and write its mask; returns a record.

        A DICOM input with an output ending in ``.dcm`` gets a DICOM SEG (:mod:`spleen_utils.dicom`).
        ``timings``: ``load_s``, ``preprocess_s``, ``inference_s``, ``postprocess_s``, ``write_s``
        and ``total_s``.
        """
        t0 = time.perf_counter()
        vol, series, t_load = self._read(input_path, output_path, series_uid)
        mask, t = self.predict_volume(vol)
        t["write_s"], _ = self._write(mask, vol, series, output_path)
        t["load_s"] = t_load
        t["total_s"] = time.perf_counter() - t0
        return self._record(input_path, output_path, vol, series, mask, t)

    def predict_path(self, input: str | Path, output: str | Path, on_case=None, on_skip=None,
                     series_uid: str | None = None) -> list[dict[str, Any]]:
        """A file to a file, or every NIfTI of a folder into a folder (same file names).

        In a folder, files named like masks (``*_label``, ``*_spleen``, ...; see
        :data:`spleen_utils.io.MASK_SUFFIXES`) and files whose voxels are a label map are skipped,
        each reported to ``on_skip(path, why)``. A DICOM series (a folder holding DICOM files, or
        a zip; ``series_uid`` picks one of several) is one volume: its mask goes to ``output``
        (``.dcm``: DICOM SEG, ``.nii.gz``: NIfTI) or, for a folder, ``<name>_seg.dcm`` in it.
        """
        from .dicom import is_dicom_input, is_seg_name
        from .io import case_name, is_nifti_name, looks_like_mask_name

        input, output = Path(input), Path(output)
        if not input.exists():
            raise DataError(f"{input}: no such file or folder.")
        dicom_input = is_dicom_input(input)
        if not dicom_input and is_seg_name(output) and not output.is_dir():
            raise DataError(f"{output}: a DICOM SEG needs a DICOM series as input (a folder or zip); for NIfTI input write .nii.gz.")
        if dicom_input:
            if output.is_dir() or not (is_nifti_name(output) or is_seg_name(output)):
                output = output / f"{input.stem if input.is_file() else input.name}_seg.dcm"
            jobs = [(input, output)]
        elif input.is_file():
            if output.is_dir() or not is_nifti_name(output):
                output = output / f"{case_name(input)}.nii.gz"
            jobs = [(input, output)]
        else:
            if output.exists() and not output.is_dir():
                raise DataError(f"{output}: is a file; give a folder for a folder of inputs.")
            if not output.exists() and is_nifti_name(output):
                raise DataError(f"{output}: looks like a file name, but {input} is a folder; give an output folder.")
            files = sorted(f for f in input.iterdir() if is_nifti_name(f) and not f.name.startswith("."))
            if not files:
                raise DataError(f"{input}: holds no .nii or .nii.gz file.")
            images = [f for f in files if not looks_like_mask_name(f)]
            for f in files:
                if f not in images and on_skip is not None:
                    on_skip(f, "its name says it is a mask, not a CT")
            if not images:
                raise DataError(f"{input}: holds only masks ({', '.join(f.name for f in files[:3])}...), no CT image.")
            jobs = [(f, output / f"{case_name(f)}.nii.gz") for f in images]
        single = len(jobs) == 1 and (input.is_file() or dicom_input)
        return self._run_jobs(jobs, on_case, on_skip, series_uid, single)

    def _run_jobs(self, jobs, on_case, on_skip, series_uid, single: bool) -> list[dict[str, Any]]:
        """Segment ``jobs`` (input, output) in order, reading the next input and writing the
        previous mask in two threads while the network runs on the current one (decompression,
        nibabel and numpy release the GIL). ``on_case`` gets each record in input order, once its
        mask is written; a record's ``total_s`` runs from the start of its read to the end of
        its write, so across a folder these overlap."""
        from concurrent.futures import ThreadPoolExecutor

        def read(job):
            t0 = time.perf_counter()
            return t0, self._read(job[0], job[1], series_uid)

        records: list[dict[str, Any]] = []

        def finish(pending) -> None:
            fut, src, dst, vol, series, mask, t, t0 = pending
            t["write_s"], t_end = fut.result()
            t["total_s"] = t_end - t0
            rec = self._record(src, dst, vol, series, mask, t)
            records.append(rec)
            if on_case is not None:
                on_case(rec)

        with ThreadPoolExecutor(1, thread_name_prefix="spleen-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="spleen-write") as writer:
            next_read = reader.submit(read, jobs[0]) if jobs else None
            pending = None
            for i, (src, dst) in enumerate(jobs):
                current, next_read = next_read, (reader.submit(read, jobs[i + 1]) if i + 1 < len(jobs) else None)
                try:
                    t0, (vol, series, t_load) = current.result()
                except NotAnImageError:
                    if single:
                        raise
                    if on_skip is not None:
                        on_skip(src, "its voxels are a label map, not a CT")
                    continue
                mask, t = self.predict_volume(vol)
                t["load_s"] = t_load
                if pending is not None:
                    finish(pending)  # one mask in flight at a time: memory stays bounded
                pending = (writer.submit(self._write, mask, vol, series, dst), src, dst, vol, series, mask, t, t0)
            if pending is not None:
                finish(pending)
        return records
