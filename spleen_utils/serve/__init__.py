"""The segmentation service: FastAPI over ONNX Runtime, safe under bad input and under load.

Endpoints
---------
``POST /predict``  a NIfTI upload (multipart form field ``file``, ``.nii`` or ``.nii.gz``) ->
                   JSON: spleen volume, bounding box (voxels and world mm), image geometry,
                   inference engine, model SHA-256, timings.
``POST /segment``  the same upload -> the mask as ``.nii.gz`` on the upload's exact grid.
                   A zip of one DICOM series is accepted by both; ``/segment`` then answers a
                   DICOM SEG (:mod:`spleen_utils.dicom`; hostile zips get 422).
``GET /health``    200 ``{"status": "ready"}`` once the model is loaded, 503 before (or if it
                   could not be loaded).
``GET /version``   model metadata (the ONNX file's own recipe) and library versions.
``GET /docs``      the OpenAPI page.

Every request runs the same pipeline as ``spleen-seg predict`` (:class:`spleen_utils.infer.Predictor`
over the ONNX backend, with the recipe read from the ONNX file's metadata): orientation, spacing,
HU window, sliding window, inversion to the upload's grid, one connected component.

Safety
------
* The upload is streamed to a temporary file with a generated name in the service's own temp
  folder (the client's file name is displayed, never used as a path), and the size limit is
  enforced while streaming (413); an upload that stalls past ``upload_timeout_s`` gets 408.
  Every temporary file is removed before the response is sent
  (a ``/segment`` mask is unlinked while open and streamed from the open handle).
* The NIfTI header is checked before any voxel is read (dimensionality, voxel type, a voxel-count
  limit); a ``.nii.gz`` is decompressed with a cap derived from its header (no gzip bombs) and
  its CRC is checked.
* Every client error is a 4xx JSON ``{"detail", "error", "request_id"}``; messages never contain
  exception text or server paths, which are logged server-side under the request id.
* Inference runs in worker threads, off the event loop, at most ``max_concurrency`` at a time;
  at most ``max_queue`` more requests wait, and the next ones get 503 with ``Retry-After`` at
  once, before their upload is read. ``/health`` keeps answering meanwhile.

Run it with ``spleen-seg serve --model model.onnx`` or, with settings from ``SPLEEN_*``
environment variables, ``uvicorn --factory spleen_utils.serve:create_app``.

The parts: :mod:`.settings` (the limits and their ``SPLEEN_*`` variables), :mod:`.uploads`
(streaming, limits, errors a client sees), :mod:`.guard` (header first, then voxels, or a zipped
DICOM series), :mod:`.pipeline` (the model, admission control, one request's work), :mod:`.app`
(the endpoints) and :mod:`.server` (uvicorn, the heartbeat). The load-test harness is
:mod:`spleen_utils.bench.service_load`. Top-level imports stay light: ``spleen-seg --help``
imports this package.
"""

from .app import create_app
from .pipeline import SegmentationService, summarize
from .server import check_heartbeat, serve
from .settings import ENV_PREFIX, ServiceSettings
from .uploads import FIELD, ServiceError, receive_upload, sanitize_filename

__all__ = ["ENV_PREFIX", "FIELD", "SegmentationService", "ServiceError", "ServiceSettings", "check_heartbeat", "create_app",
           "receive_upload", "sanitize_filename", "serve", "summarize"]
