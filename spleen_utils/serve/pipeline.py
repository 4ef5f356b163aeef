"""The service's model and limits: admission control (uploads, inference slots, Retry-After), the
pipeline of one request on an inference thread (read, predict, summarise, write the mask), and
the cancellation of an inference that runs past its time limit."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import DataError, SpleenError
from .guard import _DICOM_ZIP, HeaderInfo, _read_dicom_upload, _write_dicom_seg, read_volume
from .settings import ENV_PREFIX, ServiceSettings
from .uploads import ServiceError, Upload, _bad_image

log = logging.getLogger(__name__)


def summarize(mask, vol) -> dict[str, Any]:
    """Spleen voxels, volume and bounding box (voxel indices and world mm) of a mask on ``vol``'s grid."""
    import numpy as np

    voxels = int(np.count_nonzero(mask))
    out: dict[str, Any] = {
        "has_spleen": voxels > 0,
        "spleen_voxels": voxels,
        "spleen_volume_ml": round(voxels * vol.voxel_ml, 3),
        "bounding_box": None,
    }
    if voxels:
        lo, hi = [], []
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(np.any(mask, axis=others))
            lo.append(int(idx[0]))
            hi.append(int(idx[-1]))
        corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] + [1] for b in range(8)], dtype=np.float64)
        world = (vol.affine @ corners.T).T[:, :3]
        out["bounding_box"] = {
            "voxel_min": lo,
            "voxel_max": hi,
            "mm_min": [round(float(v), 2) for v in world.min(axis=0)],
            "mm_max": [round(float(v), 2) for v in world.max(axis=0)],
        }
    return out


class SegmentationService:
    """The model and the limits behind the HTTP app (one per app)."""

    def __init__(self, settings: ServiceSettings):
        settings.validate()
        self.settings = settings
        self.state = "loading"  # loading | ready | error
        self.predictor = None
        self.model_info: dict[str, Any] = {}
        self.engine = ""
        self._own_tmp = settings.tmp_dir is None
        if settings.tmp_dir is None:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="spleen-service-"))
        else:
            self.tmp_dir = Path(settings.tmp_dir)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.uploading = 0  # uploads streaming in (no inference slot held); event-loop only
        self.admitted = 0  # requests holding an inference slot (waiting or running); event-loop only
        self.running = 0
        self.timed_out = 0
        self.served = 0
        self.rejected = 0
        self.ewma_s: float | None = None  # smoothed time of one inference
        self._semaphore = None
        self._lock = threading.Lock()
        # inference runs on these threads only: a fixed set of threads keeps the allocator's
        # per-thread arenas (and so the RSS) from multiplying across anyio's worker pool
        self._executor = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="spleen-infer")

    # ---- model
    def load(self) -> None:
        """Open the ONNX model and build the predictor (blocking; seconds)."""
        from .. import __version__
        from ..backends import OnnxBackend, file_sha256
        from ..export import spatial_multiple
        from ..infer import Predictor

        s = self.settings
        if s.model is None:
            raise SpleenError(f"no model given: pass --model or set {ENV_PREFIX}MODEL to a spleen_utils ONNX file.")
        model = Path(s.model)
        if not model.is_file():
            raise SpleenError(f"{model}: no such model file.")
        backend = OnnxBackend(model, device=s.device)
        multiple = spatial_multiple(backend.recipe)
        roi = tuple(s.sw_roi or backend.recipe.sw_roi)
        if any(v % multiple for v in roi):
            raise SpleenError(f"the sliding-window size {roi} must be a multiple of {multiple} on every axis.")
        # each network call checks the request's cancel flag: a timed-out inference stops at its next window
        predictor = Predictor(_CancellableBackend(backend), lcc=s.lcc, roi=roi, sw_batch_size=s.sw_batch_size, progress=False)
        import onnxruntime as ort

        meta = backend.meta
        self.engine = f"onnxruntime {ort.__version__} {backend.providers[0]}"
        self.model_info = {
            "file": model.name,
            "sha256": file_sha256(model),
            "format": meta.get("format"),
            "labels": meta.get("labels"),
            "recipe": meta.get("recipe"),
            "network": meta.get("network"),
            "network_name": meta.get("network_name"),
            "opset": meta.get("opset"),
            "exporter": meta.get("exporter"),
            "source_checkpoint_sha256": meta.get("source_checkpoint_sha256"),
            "source_checkpoint": meta.get("source_checkpoint"),
            "versions_at_export": meta.get("versions"),
        }
        self.sliding_window = {"roi": list(roi), "overlap": predictor.overlap, "sw_batch_size": predictor.sw_batch_size}
        self.service_version = __version__
        self.predictor = predictor
        self.state = "ready"
        log.info("model %s (sha256 %s) ready: %s, sliding window %s", model.name, self.model_info["sha256"][:12], self.engine, roi)

    async def load_in_background(self) -> None:
        import anyio

        try:
            await anyio.to_thread.run_sync(self.load)
        except Exception:
            self.state = "error"
            log.exception("the model could not be loaded; /health answers 503")

    # ---- admission
    def _semaphore_(self):
        if self._semaphore is None:
            import anyio

            self._semaphore = anyio.Semaphore(self.settings.max_concurrency)
        return self._semaphore

    def retry_after(self) -> int:
        per = self.ewma_s if self.ewma_s is not None else 5.0
        waiting = max(self.admitted - self.settings.max_concurrency, 0) + 1
        return int(min(max(math.ceil(per * waiting / self.settings.max_concurrency), 1), 300))

    def _check_ready(self) -> None:
        if self.state != "ready":
            raise ServiceError(503, "not_ready", "the model is not loaded yet; retry shortly.", {"Retry-After": "5"})

    def upload_slot(self):
        """A place for one upload to stream in (no inference slot), or 503 + Retry-After at once."""
        return self._slot("uploading", self.settings.max_uploads, "uploads in progress")

    def admission(self):
        """An inference slot (running or queued) for a complete upload, or 503 + Retry-After at once."""
        return self._slot("admitted", self.settings.max_concurrency + self.settings.max_queue, "requests in progress or queued")

    @contextlib.contextmanager
    def _slot(self, counter: str, limit: int, what: str):
        """Count one more in ``self.<counter>`` while the block runs, or 503 + Retry-After once ``limit`` are in."""
        self._check_ready()
        if getattr(self, counter) >= limit:
            self.rejected += 1
            raise ServiceError(503, "busy", f"the service is busy ({limit} {what}); retry later.",
                               {"Retry-After": str(self.retry_after())})
        setattr(self, counter, getattr(self, counter) + 1)
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) - 1)

    # ---- the pipeline (worker thread)
    def segment(self, upload: Upload, info: HeaderInfo, mask_file: bool,
                cancel: threading.Event | None = None) -> tuple[dict[str, Any], Any]:
        """Read, predict and summarise; with ``mask_file`` also an open, already-unlinked mask file.

        ``cancel`` set (by a timed-out request) stops the work at its next check with :class:`_Cancelled`.
        """
        _tls.cancel = cancel
        try:
            return self._segment(upload, info, mask_file)
        finally:
            _tls.cancel = None

    def _segment(self, upload: Upload, info: HeaderInfo, mask_file: bool) -> tuple[dict[str, Any], Any]:
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        series = _read_dicom_upload(upload, self.settings.max_voxels) if info is _DICOM_ZIP else None
        vol = series.volume if series is not None else read_volume(upload, info)
        t["read_s"] = time.perf_counter() - t0
        _raise_if_cancelled()
        with self._lock:
            self.running += 1
        try:
            mask, tp = self.predictor.predict_volume(vol)  # type: ignore[union-attr]
        except DataError as e:  # e.g. too many voxels once resampled (spleen_utils.preprocess.check_resampled_size)
            raise _bad_image("unsupported_image", str(e)) from None
        finally:
            with self._lock:
                self.running -= 1
        _raise_if_cancelled()
        t.update(tp)
        dt = tp.get("preprocess_s", 0) + tp.get("inference_s", 0) + tp.get("postprocess_s", 0)
        self.ewma_s = dt if self.ewma_s is None else 0.7 * self.ewma_s + 0.3 * dt
        record = {
            "image": {
                "shape": list(vol.shape),
                "spacing_mm": [round(v, 4) for v in vol.spacing],
                "orientation": vol.axcodes,
                "dtype": info.dtype,
            },
            **summarize(mask, vol),
            **({"dicom": {"series": series.series.key, "slices": len(series.headers)}} if series is not None else {}),
        }
        handle = None
        if mask_file:
            t1 = time.perf_counter()
            fd, tmp = tempfile.mkstemp(prefix="mask-", suffix=".nii.gz", dir=self.tmp_dir)
            os.close(fd)
            out = Path(tmp)
            try:
                _write_dicom_seg(mask, series, out) if series is not None else _write_mask(mask, vol, out)
                handle = open(out, "rb")  # noqa: SIM115 - closed by the response's generator
            finally:
                with contextlib.suppress(FileNotFoundError):
                    out.unlink()  # the open handle keeps the data readable; the folder is clean
            t["write_s"] = time.perf_counter() - t1
        return {**record, "timings": t}, handle

    async def run_inference(self, upload: Upload, info: HeaderInfo, mask_file: bool) -> tuple[dict[str, Any], Any]:
        """:meth:`segment` on an inference thread, at most ``max_concurrency`` at once.

        Past ``inference_timeout_s`` the thread is told to stop (it does at its next network call),
        the request waits a little for it so that its memory is freed, and the client gets 503 with
        ``Retry-After``. A cancelled request (client gone, shutdown) stops its thread the same way.
        """
        import asyncio

        t0 = time.perf_counter()
        async with self._semaphore_():
            queue_s = time.perf_counter() - t0
            loop = asyncio.get_running_loop()
            cancel = threading.Event()
            fut = loop.run_in_executor(self._executor, self.segment, upload, info, mask_file, cancel)
            try:
                done, _ = await asyncio.wait({fut}, timeout=self.settings.inference_timeout_s)
            except BaseException:
                cancel.set()
                fut.add_done_callback(_discard_result)
                raise
            if not done:
                cancel.set()
                self.timed_out += 1
                limit = self.settings.inference_timeout_s
                log.warning("an inference ran past %g s; it was told to stop", limit)
                fut.add_done_callback(_discard_result)
                # hold the slot until the thread has stopped (its next window), so memory is back when we answer
                await asyncio.wait({fut}, timeout=min(max(limit, 1.0), 30.0))
                raise ServiceError(503, "inference_timeout",
                                   f"the segmentation took longer than this service allows ({limit:g} s) and was stopped; retry later.",
                                   {"Retry-After": str(self.retry_after())})
            record, handle = fut.result()
        record["timings"] = {"queue_s": queue_s, **record["timings"]}
        return record, handle

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = ThreadPoolExecutor(max_workers=self.settings.max_concurrency, thread_name_prefix="spleen-infer")
        if self._own_tmp:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


class _Cancelled(Exception):
    """A worker thread stopped because its request timed out or went away."""


#: the cancel flag of the request a worker thread is running (set by :meth:`SegmentationService.segment`)
_tls = threading.local()


def _raise_if_cancelled() -> None:
    event = getattr(_tls, "cancel", None)
    if event is not None and event.is_set():
        raise _Cancelled()


class _CancellableBackend:
    """The predictor's backend, checking its request's cancel flag before and after each network call."""

    def __init__(self, backend: Any):
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def __call__(self, x):
        _raise_if_cancelled()
        y = self._backend(x)
        _raise_if_cancelled()
        return y


def _discard_result(fut) -> None:
    """The late outcome of an abandoned inference: close its mask file, swallow its exception."""
    if fut.cancelled():
        return
    if fut.exception() is None:
        _, handle = fut.result()
        if handle is not None:
            handle.close()


def _write_mask(mask, vol, path: Path) -> None:
    """The uint8 mask on ``vol``'s grid, as :func:`spleen_utils.io.save_mask` writes it, into ``path``.

    ``path`` is the request's own ``mkstemp`` file (private, unlinked after it is opened), so no
    atomic rename is needed, and unlike ``io.save_mask`` this never touches the process umask while
    other service threads run.
    """
    import nibabel as nib
    import numpy as np

    from ..io import nifti_like

    if tuple(mask.shape) != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image grid {vol.shape}")
    nib.save(nifti_like(np.asarray(mask, dtype=np.uint8), vol.affine, vol.header), str(path))
