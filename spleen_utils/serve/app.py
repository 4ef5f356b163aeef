"""The ASGI app: ``/predict``, ``/segment``, ``/health``, ``/version`` and the OpenAPI page over one
:class:`~spleen_utils.serve.pipeline.SegmentationService`."""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at runtime
import contextlib
import logging
import time
import uuid
from typing import Any

from .guard import _DICOM_ZIP, _is_zip_upload, inspect_header
from .pipeline import SegmentationService
from .server import _configure_logging, _heartbeat
from .settings import ServiceSettings
from .uploads import FIELD, ServiceError, receive_upload

log = logging.getLogger(__name__)

_PREDICT_EXAMPLE = {
    "filename": "spleen_1.nii.gz",
    "has_spleen": True,
    "spleen_voxels": 41234,
    "spleen_volume_ml": 201.5,
    "bounding_box": {"voxel_min": [300, 180, 20], "voxel_max": [380, 260, 60], "mm_min": [-120.5, -40.2, -300.0], "mm_max": [-60.1, 20.3, -220.0]},
    "image": {"shape": [512, 512, 90], "spacing_mm": [0.78, 0.78, 5.0], "orientation": "RAS", "dtype": "int16"},
    "inference_engine": "onnxruntime 1.32.0 CPUExecutionProvider",
    "model_sha256": "…",
    "timings": {"upload_s": 0.1, "queue_s": 0.0, "read_s": 0.2, "preprocess_s": 1.0, "inference_s": 5.0, "postprocess_s": 1.0, "total_s": 7.3},
    "request_id": "3f2a9c0d1e4b",
}
_ERROR_EXAMPLE = {"detail": "the upload is not a NIfTI file (.nii or .nii.gz): no NIfTI header was found.", "error": "not_nifti", "request_id": "3f2a9c0d1e4b"}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "string", "format": "binary", "description": "a 3D CT volume, .nii or .nii.gz"}},
                }
            }
        },
    }
}


def _error_responses(*codes: int) -> dict[int, Any]:
    text = {400: "malformed request or empty file", 413: "upload larger than the limit", 415: "not multipart/form-data",
            422: "not a usable 3D NIfTI CT (or no field named 'file')", 503: "model not loaded yet, or busy (see Retry-After)"}
    return {c: {"description": text[c], "content": {"application/json": {"example": _ERROR_EXAMPLE}}} for c in codes}


def create_app(settings: ServiceSettings | None = None, service: SegmentationService | None = None):
    """The FastAPI app. With no arguments the settings come from ``SPLEEN_*`` environment variables
    (``uvicorn --factory spleen_utils.serve:create_app``) and the model loads in the background
    (``/health`` is 503 until it is ready). Pass an already loaded ``service`` to skip that.
    """
    from fastapi import FastAPI

    from .. import __version__

    _configure_logging()
    if service is None:
        service = SegmentationService(settings or ServiceSettings.from_env())
    app = FastAPI(
        title="Spleen segmentation service",
        version=__version__,
        description=(
            "3D spleen segmentation of abdominal CT (MONAI residual UNet, ONNX Runtime). Upload a NIfTI "
            f"volume in the multipart field `{FIELD}`. The model's recipe (orientation, spacing, HU window, "
            "sliding window) comes from the ONNX file itself; masks come back on the upload's own grid. "
            "Not a medical device."
        ),
        lifespan=_lifespan(service),
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_segmentation_routes(app, service)
    _add_status_routes(app, service)
    return app


def _lifespan(service: SegmentationService):
    """Start-up: load the model in the background (unless loaded) and start the heartbeat; shutdown:
    stop both, remove the heartbeat file and the service's temp folder."""
    import asyncio
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = None
        service.tmp_dir.mkdir(parents=True, exist_ok=True)  # close() removed it if the app ran before
        if service.state == "loading":
            task = asyncio.create_task(service.load_in_background())
        beat = None
        if service.settings.heartbeat_file is not None:
            beat = asyncio.create_task(_heartbeat(service, service.settings.heartbeat_file))
        try:
            yield
        finally:
            for t in (task, beat):
                if t is not None and not t.done():
                    t.cancel()
            if service.settings.heartbeat_file is not None:
                with contextlib.suppress(OSError):
                    service.settings.heartbeat_file.unlink()
            service.close()

    return lifespan


def request_id(request) -> str:
    """The request's id (made on first use): in every answer and in the server log."""
    if not hasattr(request.state, "request_id"):
        request.state.request_id = uuid.uuid4().hex[:12]
    return request.state.request_id


def _add_error_handlers(app) -> None:
    """A :class:`ServiceError` is its 4xx/503 JSON; anything else a 500 that names only the request id."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        r = request_id(request)
        log.info("request %s: %s %s -> %d %s", r, request.method, request.url.path, exc.status, exc.code)
        return JSONResponse({"detail": exc.message, "error": exc.code, "request_id": r}, status_code=exc.status,
                            headers={**exc.headers, "X-Request-ID": r})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        r = request_id(request)
        log.error("request %s: %s %s failed", r, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; the server log has the details under this request id.",
                             "error": "internal", "request_id": r}, status_code=500, headers={"X-Request-ID": r})


async def _run(service: SegmentationService, request, mask_file: bool) -> tuple[dict[str, Any], Any]:
    """One request: stream the upload in, check its header, queue for an inference slot, segment."""
    import anyio

    t0 = time.perf_counter()
    r = request_id(request)
    s = service.settings
    # the upload streams in first, holding an upload place only (slow clients are cut off with
    # 408); the request joins the inference queue once its file is complete
    with service.upload_slot():
        upload = await receive_upload(request, service.tmp_dir, s.max_upload_bytes, timeout_s=s.upload_timeout_s,
                                      grace_s=s.upload_grace_s, min_bytes_per_s=s.upload_min_bytes_per_s)
    try:
        # a zipped DICOM series has no NIfTI header: spleen_utils.dicom checks the zip and the series
        info = _DICOM_ZIP if _is_zip_upload(upload) else await anyio.to_thread.run_sync(inspect_header, upload, s.max_voxels)
        with service.admission():
            try:
                record, handle = await service.run_inference(upload, info, mask_file)
            except MemoryError:
                raise ServiceError(503, "out_of_memory", "the server ran out of memory for this image; retry later.",
                                   {"Retry-After": str(service.retry_after())}) from None
    finally:
        upload.remove()
    service.served += 1
    record["timings"] = {"upload_s": upload.seconds, **record["timings"], "total_s": time.perf_counter() - t0}
    record["timings"] = {k: round(v, 4) for k, v in record["timings"].items()}
    out = {"filename": upload.filename, **record, "inference_engine": service.engine,
           "model_sha256": service.model_info["sha256"], "request_id": r}
    log.info("request %s: %s %s (%d bytes) -> %d spleen voxels in %.2f s", r, request.url.path, upload.filename,
             upload.size, out["spleen_voxels"], out["timings"]["total_s"])
    return out, handle


def _add_segmentation_routes(app, service: SegmentationService) -> None:
    """``POST /predict`` (JSON) and ``POST /segment`` (the mask, or a DICOM SEG for a zipped series)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @app.post("/predict", summary="Segment the spleen; answer in JSON", openapi_extra=_UPLOAD_BODY,
              responses={200: {"content": {"application/json": {"example": _PREDICT_EXAMPLE}}},
                         **_error_responses(400, 413, 415, 422, 503)})
    async def predict(request: Request):
        out, _ = await _run(service, request, mask_file=False)
        return JSONResponse(out, headers={"X-Request-ID": out["request_id"]})

    @app.post("/segment", summary="Segment the spleen; answer with the mask (.nii.gz, the upload's grid)",
              openapi_extra=_UPLOAD_BODY, response_class=StreamingResponse,
              responses={200: {"content": {"application/gzip": {}}, "description": "uint8 mask, 1 = spleen, same shape and affine as the upload"},
                         **_error_responses(400, 413, 415, 422, 503)})
    async def segment(request: Request):
        out, handle = await _run(service, request, mask_file=True)
        stem = out["filename"].removesuffix(".gz").removesuffix(".nii") or "upload"
        dicom = "dicom" in out  # a zipped series in, a DICOM SEG out

        def chunks():
            try:
                while block := handle.read(1 << 16):
                    yield block
            finally:
                handle.close()

        headers = {
            "Content-Disposition": f'attachment; filename="{stem.removesuffix(".zip")}_spleen_seg.dcm"' if dicom
            else f'attachment; filename="{stem}_spleen_mask.nii.gz"',
            "X-Request-ID": out["request_id"],
            "X-Spleen-Voxels": str(out["spleen_voxels"]),
            "X-Spleen-Volume-ml": str(out["spleen_volume_ml"]),
            "X-Inference-Engine": out["inference_engine"],
        }
        return StreamingResponse(chunks(), media_type="application/dicom" if dicom else "application/gzip", headers=headers)


def _add_status_routes(app, service: SegmentationService) -> None:
    """``GET /health`` (200 once ready, 503 before) and ``GET /version``."""
    from fastapi.responses import JSONResponse

    from .. import __version__
    from ..provenance import SERVICE_LIBRARIES, versions

    @app.get("/health", summary="200 once the model is loaded, 503 before",
             responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}},
                        503: {"content": {"application/json": {"example": {"status": "loading"}}}}})
    async def health():
        body = {"status": service.state, "running": service.running, "admitted": service.admitted, "uploading": service.uploading}
        if service.state == "ready":
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/version", summary="model metadata and library versions")
    async def version():
        return {
            "spleen_utils": __version__,
            "status": service.state,
            "model": service.model_info or None,
            "inference_engine": service.engine or None,
            "sliding_window": getattr(service, "sliding_window", None),
            "limits": service.settings.public(),
            "libraries": versions(SERVICE_LIBRARIES),
        }
