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
environment variables, ``uvicorn --factory spleen_utils.service:create_app``.

This module's top-level imports stay light: ``spleen-seg --help`` imports it.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at runtime
import argparse
import contextlib
import dataclasses
import datetime as _dt
import gzip
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, SpleenError

log = logging.getLogger("spleen_utils.service")

#: the multipart form field that carries the upload
FIELD = "file"
#: bytes a multipart body may carry beyond the file itself (boundaries, part headers, small fields)
MULTIPART_SLACK = 64 * 1024
#: at most this many parts in one multipart body
MAX_PARTS = 16
#: a .nii.gz may decompress to at most this much more than its header declares (extensions, padding)
DECOMPRESS_SLACK = 16 * 1024 * 1024
ENV_PREFIX = "SPLEEN_"


# ----------------------------------------------------------------------------------------------
# settings


@dataclass
class ServiceSettings:
    """What the service runs and its limits; each field also reads from ``SPLEEN_<FIELD>``."""

    model: Path | None = None  # the ONNX file (SPLEEN_MODEL)
    device: str = "cpu"  # cpu | auto | cuda (ONNX Runtime's CUDA provider, onnxruntime-gpu only)
    max_upload_mb: float = 512.0  # the largest upload accepted (413 beyond)
    max_voxels: int = 512 * 512 * 1024  # the largest image accepted, from its header (422 beyond)
    max_concurrency: int = 1  # inferences running at once
    max_queue: int = 4  # requests waiting for a slot; more get 503 + Retry-After
    sw_roi: tuple[int, int, int] | None = None  # sliding-window size (default: the model's recipe)
    sw_batch_size: int | None = None  # windows per network call (default: the model's recipe)
    lcc: bool = True  # keep one connected component (infer.keep_one_component)
    tmp_dir: Path | None = None  # where uploads go (default: a fresh folder, removed at shutdown)
    upload_timeout_s: float = 300.0  # an upload still unfinished after this gets 408
    upload_grace_s: float = 10.0  # seconds an upload may take before the minimum rate applies
    upload_min_kbps: float = 32.0  # KiB/s an upload must keep up after the grace (0: no minimum)
    max_uploads: int = 16  # uploads streaming at once; more get 503 + Retry-After
    inference_timeout_s: float = 600.0  # an inference running longer is stopped: 503 + Retry-After
    header_timeout_s: float = 10.0  # a connection must send complete request headers within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; more get 503 + Retry-After at once
    heartbeat_file: Path | None = None  # rewritten every few seconds while ready (the Docker health check)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_min_bytes_per_s(self) -> float:
        return self.upload_min_kbps * 1024.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServiceSettings":
        """Defaults, then ``SPLEEN_*`` environment variables, then ``overrides`` (``None`` ignored)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse_setting(f.name, raw.strip())
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        """Refuse any setting the service could not run with, in one sentence naming it (at start-up)."""
        if self.model is not None:
            self.model = Path(self.model)
        if self.tmp_dir is not None:
            self.tmp_dir = Path(self.tmp_dir)
        if self.heartbeat_file is not None:
            self.heartbeat_file = Path(self.heartbeat_file)
        for name, (low, high, zero_ok) in _NUMBER_RANGES.items():
            _check_number(name, getattr(self, name), low, high, zero_ok)
        if self.sw_batch_size is not None:
            _check_number("sw_batch_size", self.sw_batch_size, 1, 4096, False)
        if self.sw_roi is not None:
            self.sw_roi = tuple(int(v) for v in self.sw_roi)  # type: ignore[assignment]
            if len(self.sw_roi) != 3 or min(self.sw_roi) < 1:
                raise SpleenError(f"sw_roi must be three positive sizes, not {self.sw_roi}.")

    def public(self) -> dict[str, Any]:
        """The limits a client may know (no paths)."""
        return {
            "max_upload_mb": self.max_upload_mb,
            "max_voxels": self.max_voxels,
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
        }


#: the numeric settings: (lowest, highest, whether 0 is allowed below the lowest); all must be finite
_NUMBER_RANGES: dict[str, tuple[float, float, bool]] = {
    "max_upload_mb": (1e-3, 1024 * 1024, False),
    "max_voxels": (1, 2**40, False),
    "max_concurrency": (1, 1024, False),
    "max_queue": (0, 100_000, True),
    "upload_timeout_s": (1e-3, 7 * 86400, False),
    "upload_grace_s": (0, 7 * 86400, True),
    "upload_min_kbps": (0, 1024 * 1024, True),
    "max_uploads": (1, 100_000, False),
    "inference_timeout_s": (1e-3, 7 * 86400, False),
    "header_timeout_s": (1e-3, 3600, False),
    "keep_alive_s": (1e-3, 3600, False),
    "max_connections": (1, 1_000_000, False),
}
_FLOAT_SETTINGS = {"max_upload_mb", "upload_timeout_s", "upload_grace_s", "upload_min_kbps", "inference_timeout_s",
                   "header_timeout_s", "keep_alive_s"}
_INT_SETTINGS = {"max_voxels", "max_concurrency", "max_queue", "sw_batch_size", "max_uploads", "max_connections"}


def _setting_names(name: str) -> str:
    option = {"upload_timeout_s": "upload-timeout", "inference_timeout_s": "inference-timeout",
              "header_timeout_s": "header-timeout", "keep_alive_s": "keep-alive", "upload_grace_s": "upload-grace"}
    return f"{name} (--{option.get(name, name.replace('_', '-'))}, {ENV_PREFIX}{name.upper()})"


def _check_number(name: str, value: Any, low: float, high: float, zero_ok: bool) -> None:
    """A finite number in ``[low, high]`` (or 0 where ``zero_ok``); else one sentence naming the setting."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and name in _INT_SETTINGS and value != int(value):
        ok = False
    if ok and not (low <= value <= high or (zero_ok and value == 0)):
        ok = False
    if not ok:
        kind = "a whole number" if name in _INT_SETTINGS else "a finite number"
        zero = "0 or " if zero_ok and low > 0 else ""
        def num(v: float) -> str:
            return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"

        raise SpleenError(f"{_setting_names(name)} must be {kind} from {zero}{num(low)} to {num(high)}, not {value!r}.")


def _parse_setting(name: str, raw: str) -> Any:
    try:
        if name in ("model", "tmp_dir", "heartbeat_file"):
            return Path(raw)
        if name == "device":
            return raw
        if name in _FLOAT_SETTINGS:
            return float(raw)
        if name in _INT_SETTINGS:
            return int(raw)
        if name == "sw_roi":
            return tuple(int(v) for v in raw.split(","))
        if name == "lcc":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        pass
    raise SpleenError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid value.")


# ----------------------------------------------------------------------------------------------
# errors a client sees


class ServiceError(Exception):
    """An HTTP error with a message safe to show a client (no exception text, no paths)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _bad_image(code: str, message: str) -> ServiceError:
    return ServiceError(422, code, message)


# ----------------------------------------------------------------------------------------------
# uploads: streamed to a generated temp file, size-limited while streaming


def sanitize_filename(name: str | None, limit: int = 128) -> str:
    """A display-only name: the last path component, ASCII letters/digits/``._-``, no leading dots."""
    if not name:
        return "upload"
    name = unicodedata.normalize("NFKC", str(name)).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._")
    return name[:limit] or "upload"


def _safe_names(names: list[str]) -> str:
    shown = [re.sub(r"[^A-Za-z0-9._-]", "?", n)[:40] for n in names[:5]]
    return ", ".join(repr(s) for s in shown) + (" ..." if len(names) > 5 else "")


@dataclass
class Upload:
    path: Path  # a generated name in the service's temp folder, ending .nii or .nii.gz
    filename: str  # sanitised client name, for display only
    size: int
    gzip: bool
    seconds: float = 0.0
    extra: list[Path] = field(default_factory=list)  # more temp files made for this upload

    def remove(self) -> None:
        for p in [self.path, *self.extra]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


class _UploadSink:
    """python-multipart callbacks: the ``file`` part goes to a temp file, other parts are counted."""

    def __init__(self, tmp_dir: Path, max_bytes: int, field_name: str = FIELD):
        self.tmp_dir, self.max_bytes, self.field_name = tmp_dir, max_bytes, field_name
        self.parts: list[str] = []
        self.path: Path | None = None
        self.fd: int | None = None
        self.size = 0
        self.head = b""
        self.filename: str | None = None
        self.files = 0
        self._writing = False
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""

    # callbacks
    def on_part_begin(self) -> None:
        self._disposition = b""
        self._writing = False
        if len(self.parts) >= MAX_PARTS:
            raise ServiceError(400, "too_many_parts", f"the form has more than {MAX_PARTS} parts; send one field named {self.field_name!r}.")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.strip().lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        self.parts.append(name)
        if name != self.field_name:
            return
        self.files += 1
        if self.files > 1:
            raise ServiceError(400, "too_many_files", f"send one file in the field {self.field_name!r}, not several.")
        filename = options.get(b"filename")
        self.filename = filename.decode("utf-8", "replace") if filename is not None else None
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
        self.fd, self.path, self._writing = fd, Path(tmp), True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._writing:
            return  # other fields: ignored (their size counts towards the body limit)
        chunk = data[start:end]
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _too_large(self.max_bytes)
        if len(self.head) < 4:
            self.head += chunk[: 4 - len(self.head)]
        view = memoryview(chunk)
        while view:  # a local file write: microseconds per chunk, fine on the event loop
            n = os.write(self.fd, view)  # type: ignore[arg-type]
            view = view[n:]

    def on_part_end(self) -> None:
        if self._writing:
            self.close()
        self._writing = False

    def on_end(self) -> None:
        pass

    def callbacks(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_end")}

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


#: how often a waiting upload re-checks its deadline
UPLOAD_SLICE_S = 0.25


class _LoopLag:
    """The seconds by which the event loop ran late since this was made: the summed overshoots of a
    short repeating timer. A loop starved of CPU wakes everyone late; an upload deadline is
    extended by that much, so that the server's slowness is never held against its client."""

    def __init__(self, tick: float = 0.1, slack: float = 0.05):
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.tick, self.slack, self.late = tick, slack, 0.0
        self._t = time.monotonic()
        self._handle = self.loop.call_later(tick, self._on_tick)

    def _on_tick(self) -> None:
        now = time.monotonic()
        over = now - self._t - self.tick
        if over > self.slack:
            self.late += over
        self._t = now
        self._handle = self.loop.call_later(self.tick, self._on_tick)

    def close(self) -> None:
        self._handle.cancel()


def _upload_too_slow(received: int, seconds: float, timeout_s: float | None, grace_s: float, rate: float) -> ServiceError:
    if timeout_s is not None and seconds >= timeout_s:
        why = f"did not finish within {timeout_s:g} s"
    else:
        why = f"arrived slower than {rate / 1024:g} KiB/s ({received:,} bytes in {seconds:.0f} s)"
    return ServiceError(408, "upload_timeout", f"the upload {why}; send it again on a faster connection.",
                        {"Connection": "close"})


def _too_large(max_bytes: int) -> ServiceError:
    return ServiceError(413, "upload_too_large", f"the upload is larger than this service accepts ({max_bytes / 2**20:g} MiB).")


async def receive_upload(request: Any, tmp_dir: Path, max_bytes: int, field_name: str = FIELD, *,
                         timeout_s: float | None = None, grace_s: float = 0.0, min_bytes_per_s: float = 0.0) -> Upload:
    """Stream a multipart upload into a temp file in ``tmp_dir``; the size limit holds while streaming.

    ``request`` is a Starlette request (only ``headers`` and ``receive()`` are used). Raises
    :class:`ServiceError` (400/413/415/422, and 408 for a slow client); on any failure no file is
    left behind. A slow client is cut off with 408: the body must be complete within ``timeout_s``,
    and after ``grace_s`` seconds it must have kept up ``min_bytes_per_s`` (a deadline that moves
    on with every byte received, so a slow-loris client trickling a few bytes is cut off after
    about ``grace_s`` seconds, while a large upload at a decent rate is not).
    """
    import anyio
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    t0 = time.perf_counter()
    body_limit = max_bytes + MULTIPART_SLACK
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ServiceError(400, "bad_request", "the Content-Length header is not a number.") from None
        if declared == 0:
            raise ServiceError(400, "empty_body", f"the request body is empty; send a NIfTI file in the multipart form field {field_name!r}.")
        if declared > body_limit:
            raise _too_large(max_bytes)  # refused before a byte of the body is read
    mime, params = parse_options_header(request.headers.get("content-type"))
    if mime != b"multipart/form-data":
        raise ServiceError(
            415, "not_multipart",
            f"send the NIfTI file as multipart/form-data in the field {field_name!r} (e.g. curl -F {field_name}=@ct.nii.gz).",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "bad_multipart", "the multipart Content-Type has no boundary.")
    sink = _UploadSink(tmp_dir, max_bytes, field_name)
    parser = MultipartParser(boundary, sink.callbacks())
    total = 0
    start = time.monotonic()
    hard = start + timeout_s if timeout_s is not None else math.inf
    lag = _LoopLag()  # how late the event loop itself runs (CPU starvation): not the client's fault

    def deadline() -> float:
        if min_bytes_per_s > 0:
            return min(hard, start + grace_s + total / min_bytes_per_s) + lag.late
        return hard + lag.late

    try:
        # ASGI receive() rather than request.stream(): a receive() cut short by its time slice loses
        # nothing (the server keeps the bytes), so the deadline can be re-checked every slice
        while True:
            remaining = deadline() - time.monotonic()
            if remaining <= 0:
                for _ in range(2):  # let an overdue lag timer count a stall that just ended
                    await anyio.sleep(0)
                if deadline() <= time.monotonic():
                    raise _upload_too_slow(total, time.monotonic() - start, timeout_s, grace_s, min_bytes_per_s)
                continue
            message = None
            with anyio.move_on_after(min(remaining, UPLOAD_SLICE_S)):
                message = await request.receive()
            if message is None:
                continue
            if message["type"] == "http.disconnect":
                raise ServiceError(400, "upload_incomplete", "the client closed the connection before the upload was complete.")
            chunk = message.get("body", b"")
            if chunk:
                total += len(chunk)
                if total > body_limit:
                    raise _too_large(max_bytes)
                parser.write(chunk)
            if not message.get("more_body", False):
                break
        if total == 0:
            raise ServiceError(400, "empty_body", f"the request body is empty; send a NIfTI file in the multipart form field {field_name!r}.")
        parser.finalize()
        sink.close()
        if sink.path is None:
            found = f" (found: {_safe_names(sink.parts)})" if sink.parts else ""
            raise ServiceError(422, "missing_file_field", f"no multipart form field named {field_name!r}{found}; send the NIfTI file as {field_name!r}.")
        if sink.size == 0:
            raise ServiceError(400, "empty_file", "the uploaded file is empty.")
        gz = sink.head[:2] == b"\x1f\x8b"
        final = sink.path.with_name(sink.path.name[: -len(".part")] + (".nii.gz" if gz else ".nii"))
        os.replace(sink.path, final)
        sink.path = final
    except FormParserError:
        sink.discard()
        raise ServiceError(400, "bad_multipart", "the multipart body is malformed.") from None
    except BaseException:
        sink.discard()
        raise
    finally:
        lag.close()
    return Upload(path=final, filename=sanitize_filename(sink.filename), size=sink.size, gzip=gz, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# reading the upload: header first, then voxels


@dataclass
class HeaderInfo:
    shape: tuple[int, int, int]
    dtype: str
    nbytes: int  # voxel bytes the header declares (+ its vox_offset)


def inspect_header(upload: Upload, max_voxels: int) -> HeaderInfo:
    """Validate the NIfTI header alone (no voxel is read): 3D, numeric, within ``max_voxels``."""
    import nibabel as nib
    import numpy as np

    from .errors import DataError
    from .io import NiftiHeaderError, check_header, check_nifti_file

    try:  # the header and its extension table, with bounded reads, before nibabel parses them
        check_nifti_file(upload.path, "upload", gz=upload.gzip)
    except NiftiHeaderError as e:
        raise _bad_image(e.kind, str(e)) from None
    try:
        img = nib.load(str(upload.path))
    except nib.spatialimages.HeaderDataError:
        raise _bad_image("bad_header", "the NIfTI header holds invalid values (nibabel refuses it).") from None
    except nib.filebasedimages.ImageFileError:
        if upload.gzip and _gzip_head_is_short(upload.path, 348):
            raise _bad_image("corrupt_nifti", "the .nii.gz ends before its NIfTI header does: the file is truncated or corrupt.") from None
        raise _bad_image("not_nifti", "the upload is not a NIfTI file (.nii or .nii.gz): no NIfTI header was found.") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, MemoryError, OverflowError):
        raise _bad_image("corrupt_nifti", "the NIfTI header cannot be read: the file is truncated or corrupt.") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _bad_image("not_nifti", "the upload is not a NIfTI-1 or NIfTI-2 image.")
    def too_large(shape: tuple[int, ...], voxels: int) -> ServiceError:
        return _bad_image(
            "image_too_large",
            f"the NIfTI header declares {'x'.join(map(str, shape))} = {voxels:,} voxels; this service accepts at most {max_voxels:,}.",
        )

    try:
        shape = check_header(img, "image", "upload")
    except DataError as e:  # messages name only "upload", the shape and the voxel type
        raw = tuple(int(v) for v in img.shape)
        declared = math.prod(raw)  # Python ints: no overflow, even for NIfTI-2's 64-bit dimensions
        if declared > max_voxels:
            raise too_large(raw, declared) from None
        raise _bad_image("unsupported_image", str(e)) from None
    voxels = math.prod(shape)
    if voxels > max_voxels:
        raise too_large(shape, voxels)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise _bad_image("bad_geometry", "the NIfTI header's affine is degenerate (zero or non-finite voxel size).")
    dtype = img.get_data_dtype()
    offset = int(img.header.get_data_offset()) if hasattr(img.header, "get_data_offset") else 352
    return HeaderInfo(shape=shape, dtype=str(dtype), nbytes=offset + voxels * dtype.itemsize)


def _gzip_head_is_short(path: Path, n: int) -> bool:
    """Whether a gzip file cannot give its first ``n`` bytes (cut or damaged before them)."""
    try:
        with gzip.open(path, "rb") as f:
            return len(f.read(n)) < n
    except (EOFError, OSError, zlib.error):
        return True


def _gunzip_capped(src: Path, dst: Path, limit: int, chunk: int = 1 << 20) -> None:
    """Decompress ``src`` into ``dst``; stop beyond ``limit`` bytes; a bad CRC or a cut stream raises."""
    written = 0
    try:
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            while True:
                block = fin.read(chunk)
                if not block:
                    break
                written += len(block)
                if written > limit:
                    raise _bad_image("corrupt_nifti", "the .nii.gz holds more data than its NIfTI header declares.")
                fout.write(block)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile):
        raise _bad_image("corrupt_nifti", "the .nii.gz is truncated or corrupt (gzip stream or checksum error).") from None


def read_volume(upload: Upload, info: HeaderInfo):
    """The upload as a float32 :class:`spleen_utils.io.Volume` (after :func:`inspect_header`)."""
    import nibabel as nib
    import numpy as np

    from .io import Volume

    path = upload.path
    if upload.gzip:
        fd, raw = tempfile.mkstemp(prefix="raw-", suffix=".nii", dir=path.parent)
        os.close(fd)
        raw_path = Path(raw)
        upload.extra.append(raw_path)
        _gunzip_capped(path, raw_path, info.nbytes + DECOMPRESS_SLACK)
        path.unlink()  # the compressed copy is no longer needed
        path = raw_path
    try:
        img = nib.load(str(path), mmap=False)
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(info.shape)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError):
        raise _bad_image("corrupt_nifti", "the NIfTI voxel data is truncated or corrupt.") from None
    if not np.isfinite(data).all():
        raise _bad_image("non_finite_voxels", "the image contains NaN or infinite voxels.")
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=None)


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


# a zipped DICOM series (spleen_utils.dicom): in, a volume on the series' grid; out, a DICOM SEG
#: stands for the NIfTI header of a zip upload (there is none; the DICOM reader checks the zip)
_DICOM_ZIP = HeaderInfo(shape=(0, 0, 0), dtype="DICOM series", nbytes=0)


def _is_zip_upload(upload: Upload) -> bool:
    with open(upload.path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _read_dicom_upload(upload: Upload, max_voxels: int):
    """The series in a zip upload (:func:`spleen_utils.dicom.read_series` with upload limits): 422
    for a hostile or unsuitable zip, 415 when this server has no DICOM support installed."""
    from .dicom import read_series, upload_limits
    from .errors import DataError

    try:
        return read_series(upload.path, name=upload.filename, hint="upload one series per zip", max_voxels=max_voxels,
                           **upload_limits(max_voxels))
    except DataError as e:
        raise _bad_image("bad_dicom", str(e)) from None
    except SpleenError:
        raise ServiceError(415, "dicom_unsupported", "this server cannot read DICOM (its 'dicom' extra is not installed); upload NIfTI.") from None


def _write_dicom_seg(mask, series, path: Path) -> None:
    from .dicom import write_seg
    from .errors import DataError

    try:
        write_seg(mask, series, path)
    except DataError as e:  # e.g. an anonymised series without UIDs
        raise _bad_image("no_dicom_seg", str(e)) from None


# ----------------------------------------------------------------------------------------------
# the service: model, admission control, the pipeline


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
        from . import __version__
        from .backends import OnnxBackend
        from .export import spatial_multiple
        from .infer import Predictor
        from .backends import file_sha256

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

    @contextlib.contextmanager
    def upload_slot(self):
        """A place for one upload to stream in (no inference slot), or 503 + Retry-After at once."""
        self._check_ready()
        if self.uploading >= self.settings.max_uploads:
            self.rejected += 1
            raise ServiceError(
                503, "busy", f"the service is busy ({self.settings.max_uploads} uploads in progress); retry later.",
                {"Retry-After": str(self.retry_after())},
            )
        self.uploading += 1
        try:
            yield
        finally:
            self.uploading -= 1

    @contextlib.contextmanager
    def admission(self):
        """An inference slot (running or queued) for a complete upload, or 503 + Retry-After at once."""
        self._check_ready()
        limit = self.settings.max_concurrency + self.settings.max_queue
        if self.admitted >= limit:
            self.rejected += 1
            raise ServiceError(
                503, "busy", f"the service is busy ({limit} requests in progress or queued); retry later.",
                {"Retry-After": str(self.retry_after())},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

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
        except DataError as e:  # e.g. too many voxels once resampled (spleen_utils.infer.check_resampled_size)
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

    if tuple(mask.shape) != vol.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image grid {vol.shape}")
    array = np.asarray(mask, dtype=np.uint8)
    hdr = vol.header.copy() if vol.header is not None else None
    img = nib.Nifti1Image(array, vol.affine, header=hdr)
    img.set_data_dtype(np.uint8)
    if hdr is not None:
        img.set_qform(vol.affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(vol.affine, code=int(hdr["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))


# ----------------------------------------------------------------------------------------------
# the ASGI app

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


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("onnxruntime", "torch", "monai", "numpy", "nibabel", "fastapi", "starlette", "uvicorn", "python-multipart"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def create_app(settings: ServiceSettings | None = None, service: SegmentationService | None = None):
    """The FastAPI app. With no arguments the settings come from ``SPLEEN_*`` environment variables
    (``uvicorn --factory spleen_utils.service:create_app``) and the model loads in the background
    (``/health`` is 503 until it is ready). Pass an already loaded ``service`` to skip that.
    """
    from contextlib import asynccontextmanager

    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from . import __version__

    _configure_logging()
    if service is None:
        service = SegmentationService(settings or ServiceSettings.from_env())

    @asynccontextmanager
    async def lifespan(app):
        task = None
        service.tmp_dir.mkdir(parents=True, exist_ok=True)  # close() removed it if the app ran before
        if service.state == "loading":
            import asyncio

            task = asyncio.create_task(service.load_in_background())
        beat = None
        if service.settings.heartbeat_file is not None:
            import asyncio

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

    app = FastAPI(
        title="Spleen segmentation service",
        version=__version__,
        description=(
            "3D spleen segmentation of abdominal CT (MONAI residual UNet, ONNX Runtime). Upload a NIfTI "
            f"volume in the multipart field `{FIELD}`. The model's recipe (orientation, spacing, HU window, "
            "sliding window) comes from the ONNX file itself; masks come back on the upload's own grid. "
            "Not a medical device."
        ),
        lifespan=lifespan,
    )
    app.state.service = service

    def rid(request: Request) -> str:
        if not hasattr(request.state, "request_id"):
            request.state.request_id = uuid.uuid4().hex[:12]
        return request.state.request_id

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        r = rid(request)
        log.info("request %s: %s %s -> %d %s", r, request.method, request.url.path, exc.status, exc.code)
        return JSONResponse({"detail": exc.message, "error": exc.code, "request_id": r}, status_code=exc.status,
                            headers={**exc.headers, "X-Request-ID": r})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        r = rid(request)
        log.error("request %s: %s %s failed", r, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error; the server log has the details under this request id.",
                             "error": "internal", "request_id": r}, status_code=500, headers={"X-Request-ID": r})

    async def run(request: Request, mask_file: bool):
        t0 = time.perf_counter()
        r = rid(request)
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

    @app.post("/predict", summary="Segment the spleen; answer in JSON", openapi_extra=_UPLOAD_BODY,
              responses={200: {"content": {"application/json": {"example": _PREDICT_EXAMPLE}}},
                         **_error_responses(400, 413, 415, 422, 503)})
    async def predict(request: Request):
        out, _ = await run(request, mask_file=False)
        return JSONResponse(out, headers={"X-Request-ID": out["request_id"]})

    @app.post("/segment", summary="Segment the spleen; answer with the mask (.nii.gz, the upload's grid)",
              openapi_extra=_UPLOAD_BODY, response_class=StreamingResponse,
              responses={200: {"content": {"application/gzip": {}}, "description": "uint8 mask, 1 = spleen, same shape and affine as the upload"},
                         **_error_responses(400, 413, 415, 422, 503)})
    async def segment(request: Request):
        out, handle = await run(request, mask_file=True)
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
            "libraries": _library_versions(),
        }

    return app


#: seconds between two heartbeats; a health check calls a heartbeat older than 3 of these stale
HEARTBEAT_S = 5.0


def write_heartbeat(service: "SegmentationService", path: Path) -> None:
    """``{"status", "time", ...}`` into ``path``, atomically (a reader never sees half a file)."""
    body = {"status": service.state, "time": time.time(), "pid": os.getpid(), "running": service.running,
            "admitted": service.admitted, "uploading": service.uploading}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


async def _heartbeat(service: "SegmentationService", path: Path, every: float = HEARTBEAT_S) -> None:
    """Written by the event loop itself: a fresh file proves the loop runs, whatever the sockets suffer."""
    import anyio

    while True:
        try:
            write_heartbeat(service, path)
        except OSError:
            log.warning("cannot write the heartbeat file %s", path, exc_info=True)
        await anyio.sleep(every)


def check_heartbeat(path: str | Path, max_age_s: float = 3 * HEARTBEAT_S) -> tuple[bool, str]:
    """Whether the heartbeat at ``path`` says ready and is fresh; with a sentence either way.

    The Docker ``HEALTHCHECK`` runs this instead of an HTTP request, so that a flood of half-open
    connections (which a reverse proxy should stop, see book/service.md) cannot mark a working
    service unhealthy; it still fails when the event loop stalls or the model is not loaded.
    """
    try:
        p = Path(path)
        body = json.loads(p.read_text())
        age = time.time() - p.stat().st_mtime
    except (OSError, ValueError):
        return False, f"no readable heartbeat at {path}: the service is not running (yet)."
    if age > max_age_s:
        return False, f"the heartbeat is {age:.0f} s old (more than {max_age_s:g} s): the service is stalled."
    if body.get("status") != "ready":
        return False, f"the service is {body.get('status')!r}, not ready."
    return True, f"ready (heartbeat {age:.1f} s old)."


def _configure_logging() -> None:
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


# ----------------------------------------------------------------------------------------------
# a local server process and a load test


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_command() -> list[str]:
    """``spleen-seg`` of this interpreter's environment (the Docker image's start command)."""
    exe = Path(sys.executable).parent / "spleen-seg"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "spleen_utils.cli"]


class LocalServer:
    """``spleen-seg serve`` in a subprocess on 127.0.0.1 and a free port; a context manager."""

    def __init__(self, model: str | Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0, log_path: str | Path | None = None):
        self.model, self.args, self.env = Path(model), list(args or []), env
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log_path = Path(log_path) if log_path else None
        self._log = None

    def __enter__(self):
        import urllib.error
        import urllib.request

        cmd = [*serve_command(), "serve", "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        if self._log_path is None:
            self._log = tempfile.TemporaryFile()
        else:
            self._log = open(self._log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not become ready within {self.startup_timeout:.0f} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        if self._log_path is not None:
            return self._log_path.read_text(errors="replace")
        self._log.seek(0)
        data = self._log.read().decode(errors="replace")
        self._log.seek(0, 2)
        return data

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class RssSampler:
    """Peak resident memory of a process (and its children), sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        import psutil

        total = 0
        with contextlib.suppress(psutil.Error):
            total = self.proc.memory_info().rss
            for c in self.proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += c.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p90": round(float(np.percentile(a, 90)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
        "mean": round(float(a.mean()), 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
    }


def load_test(url: str, file: str | Path, n: int = 20, concurrency: int = 4, endpoint: str = "/predict",
              timeout: float = 600.0, on_response=None) -> dict[str, Any]:
    """Send ``n`` uploads of ``file`` to ``url + endpoint`` from ``concurrency`` threads at once.

    Returns throughput (answered 200 per second of wall time), latency percentiles of the 200s and
    of the 503s, the count of each status, and the count of requests that got no HTTP answer.
    ``on_response(i, status, seconds, response_or_None)`` is called from the worker threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    data = Path(file).read_bytes()
    name = Path(file).name
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    with httpx.Client(base_url=url, timeout=timeout, limits=limits) as client:
        def one(i: int):
            t0 = time.perf_counter()
            try:
                r = client.post(endpoint, files={FIELD: (name, data, "application/octet-stream")})
                status, resp = r.status_code, r
            except httpx.HTTPError as e:
                status, resp = f"error:{type(e).__name__}", None
            dt = time.perf_counter() - t0
            if on_response is not None:
                on_response(i, status, dt, resp)
            return status, dt

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0

    counts: dict[str, int] = {}
    for status, _ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    ok = [dt for s, dt in results if s == 200]
    busy = [dt for s, dt in results if s == 503]
    return {
        "url": url,
        "endpoint": endpoint,
        "file": name,
        "upload_bytes": len(data),
        "n": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "status_counts": counts,
        "ok": len(ok),
        "rejected_503": len(busy),
        "failed": n - len(ok) - len(busy),
        "throughput_rps": round(len(ok) / wall, 4) if wall > 0 else None,
        "latency_s": _percentiles(ok),
        "latency_503_s": _percentiles(busy),
    }


def default_bench_image(profile: str = "quick") -> Path | None:
    from .config import get_config

    cfg = get_config(profile)
    for sub in ("imagesTs", "imagesTr"):
        folder = cfg.dataset_dir / sub
        if folder.is_dir():
            files = sorted(f for f in folder.iterdir() if f.name.endswith((".nii", ".nii.gz")) and not f.name.startswith("."))
            if files:
                return files[0]
    return None


def run_bench(model: str | Path | None, file: str | Path, url: str | None = None, n: int = 12, concurrency: int = 4,
              server_args: list[str] | None = None, endpoint: str = "/predict") -> dict[str, Any]:
    """A load test against ``url``, or against a local ``spleen-seg serve`` of ``model`` (with its peak RSS)."""
    import urllib.request

    from .io import load_nifti

    vol = load_nifti(file)
    record: dict[str, Any] = {
        "kind": "service_load_test",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "image": {"file": Path(file).name, "shape": list(vol.shape), "spacing_mm": [round(v, 3) for v in vol.spacing]},
    }
    del vol
    if url is None:
        if model is None:
            raise SpleenError("give --model (to start a local server) or --url (a running one).")
        with LocalServer(model, args=server_args) as server:
            with urllib.request.urlopen(server.url + "/version", timeout=10) as r:
                version = json.load(r)
            with RssSampler(server.pid) as rss:
                idle = rss.rss()
                result = load_test(server.url, file, n=n, concurrency=concurrency, endpoint=endpoint)
            record["server"] = {"command": "spleen-seg serve " + " ".join(server_args or []), "rss_idle_mb": round(idle / 2**20, 1),
                                "rss_peak_mb": round(rss.peak / 2**20, 1)}
    else:
        with urllib.request.urlopen(url.rstrip("/") + "/version", timeout=10) as r:
            version = json.load(r)
        result = load_test(url, file, n=n, concurrency=concurrency, endpoint=endpoint)
        record["server"] = {"url": url}
    record["model"] = {k: (version.get("model") or {}).get(k) for k in ("file", "sha256", "source_checkpoint")}
    record["inference_engine"] = version.get("inference_engine")
    record["sliding_window"] = version.get("sliding_window")
    record["limits"] = version.get("limits")
    record["result"] = result
    return record


# ----------------------------------------------------------------------------------------------
# the command line: `spleen-seg serve` and `spleen-seg serve-bench`


from .cli import _csv_ints  # noqa: E402  (the CLI module is already loaded when these run)


#: the largest request line + headers uvicorn buffers (h11's incomplete event); larger get 400
MAX_HEADER_BYTES = 16 * 1024
#: the listening socket's accept queue (connections the kernel holds before uvicorn accepts them)
BACKLOG = 2048


def http_protocol(settings: ServiceSettings) -> type:
    """uvicorn's h11 protocol with the two limits uvicorn lacks, for slow and many clients.

    * A connection must deliver complete request headers within ``header_timeout_s`` of opening
      (or of its previous answer); uvicorn alone keeps a connection that sends half a request
      line forever. A connection whose answer is out while its client still sends an unwanted
      body (an early 4xx/503) is closed after the same time.
    * Beyond ``max_connections`` open connections a new one gets 503 JSON with ``Retry-After`` at
      once and is closed (uvicorn's own ``limit_concurrency`` answers plain text, no Retry-After).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout = settings.header_timeout_s
    max_connections = settings.max_connections

    def busy_response() -> bytes:
        body = json.dumps({"detail": "the service has too many open connections; retry later.", "error": "busy",
                           "request_id": uuid.uuid4().hex[:12]}).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Protocol(H11Protocol):
        _header_timer = None
        _rejected = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._rejected = True
                self.connections.discard(self)
                transport.write(busy_response())
                if transport.can_write_eof():
                    transport.write_eof()
                # keep reading (and dropping) what the client still sends for a moment, so that
                # closing does not reset the connection before the client has read the answer
                self._header_timer = self.loop.call_later(min(header_timeout, 2.0), transport.close)
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._rejected:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._rejected:
                return
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            waiting = self.conn.their_state is h11.IDLE  # no complete request yet
            answered = self.conn.our_state in (h11.DONE, h11.MUST_CLOSE) and self.conn.their_state is not h11.DONE
            if waiting or answered:
                self.transport.close()

    return Protocol


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """uvicorn's timeouts and limits, set deliberately (see book/service.md)."""
    return {
        "http": http_protocol(settings),  # h11, with a header timeout and a connection cap answering 503 JSON
        "limit_concurrency": None,  # the protocol above caps connections; the app caps uploads and inferences
        "backlog": BACKLOG,
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "timeout_graceful_shutdown": 30,
        "ws": "none",
        "server_header": False,
    }


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    settings = ServiceSettings.from_env(
        model=a.model, device=a.device, max_upload_mb=a.max_upload_mb, max_voxels=a.max_voxels,
        max_concurrency=a.max_concurrency, max_queue=a.max_queue, sw_roi=a.sw_roi, sw_batch_size=a.sw_batch_size,
        tmp_dir=a.tmp_dir, upload_timeout_s=a.upload_timeout_s, upload_grace_s=a.upload_grace_s,
        upload_min_kbps=a.upload_min_kbps, max_uploads=a.max_uploads, inference_timeout_s=a.inference_timeout_s,
        header_timeout_s=a.header_timeout_s, keep_alive_s=a.keep_alive_s, max_connections=a.max_connections,
        heartbeat_file=a.heartbeat_file,
    )
    _configure_logging()
    service = SegmentationService(settings)
    try:
        service.load()  # fail fast with one sentence; the port opens once the model is ready
    except BaseException:
        service.close()
        raise
    app = create_app(service=service)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, **uvicorn_options(service.settings))
    return 0


def cmd_serve_bench(a: argparse.Namespace) -> int:
    from .config import get_config
    from .io import atomic_path

    file = Path(a.file) if a.file else default_bench_image(a.profile)
    if file is None:
        raise SpleenError(f"no --file given and no test image in the {a.profile} dataset; run `spleen-seg data synthetic` or pass --file.")
    model = a.model
    if model is None and a.url is None:
        default = get_config(a.profile).out_dir / "model.onnx"
        if not default.exists():
            raise SpleenError(f"no --model or --url given and no {default}; export a model first.")
        model = default
    server_args = ["--max-concurrency", str(a.max_concurrency), "--max-queue", str(a.max_queue)]
    if a.sw_roi:
        server_args += ["--sw-roi", ",".join(map(str, a.sw_roi))]
    if a.sw_batch_size:
        server_args += ["--sw-batch-size", str(a.sw_batch_size)]
    record = run_bench(model, file, url=a.url, n=a.n, concurrency=a.concurrency, server_args=server_args, endpoint=a.endpoint)
    record["profile"] = a.profile
    if a.note:
        record["note"] = a.note
    out = Path(a.out) if a.out else get_config(a.profile).out_dir / "bench" / "service.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    r = record["result"]
    lat = r["latency_s"] or {}
    print(f"{r['n']} requests, {r['concurrency']} at a time: {r['ok']} answered, {r['rejected_503']} busy (503), {r['failed']} failed; "
          f"{r['throughput_rps']} req/s; latency p50 {lat.get('p50')} s, p90 {lat.get('p90')} s, p99 {lat.get('p99')} s")
    print(f"written: {out}")
    return 0 if r["failed"] == 0 else 1


def register(subparsers) -> None:
    """Add ``serve`` and ``serve-bench`` to the ``spleen-seg`` command."""
    s = subparsers.add_parser("serve", help="HTTP segmentation service (FastAPI + ONNX Runtime)",
                              description="Serve POST /predict, POST /segment, GET /health, GET /version and /docs. "
                                          f"Unset options read {ENV_PREFIX}* environment variables (e.g. {ENV_PREFIX}MODEL).")
    s.add_argument("--model", help=f"a spleen_utils ONNX file (default: ${ENV_PREFIX}MODEL)")
    s.add_argument("--host", default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"), help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=int(os.environ.get(ENV_PREFIX + "PORT", "8000") or 8000), help="default: 8000")
    s.add_argument("--max-upload-mb", type=float, help="largest upload in MiB (default: 512)")
    s.add_argument("--max-voxels", type=int, help="largest image in voxels, from its header (default: 512*512*1024)")
    s.add_argument("--max-concurrency", type=int, help="inferences at once (default: 1)")
    s.add_argument("--max-queue", type=int, help="requests that may wait; more get 503 + Retry-After (default: 4)")
    s.add_argument("--device", choices=["cpu", "auto", "cuda"], help="ONNX Runtime device (default: cpu)")
    s.add_argument("--sw-roi", type=_csv_ints, help="sliding-window size, e.g. 96,96,96 (default: the model's recipe)")
    s.add_argument("--sw-batch-size", type=int, help="windows per network call; fewer use less memory (default: the model's recipe)")
    s.add_argument("--tmp-dir", help="folder for uploads (default: a fresh temporary folder)")
    s.add_argument("--upload-timeout", type=float, dest="upload_timeout_s", help="seconds an upload may take (default: 300; 408 beyond)")
    s.add_argument("--upload-grace", type=float, dest="upload_grace_s", help="seconds before --upload-min-kbps applies (default: 10)")
    s.add_argument("--upload-min-kbps", type=float, help="KiB/s an upload must keep up after the grace; slower gets 408 (default: 32; 0: none)")
    s.add_argument("--max-uploads", type=int, help="uploads streaming at once; more get 503 + Retry-After (default: 16)")
    s.add_argument("--inference-timeout", type=float, dest="inference_timeout_s", help="seconds one inference may run; longer is stopped, 503 (default: 600)")
    s.add_argument("--header-timeout", type=float, dest="header_timeout_s", help="seconds a connection has to send its request headers (default: 10)")
    s.add_argument("--keep-alive", type=float, dest="keep_alive_s", help="seconds an idle keep-alive connection stays open (default: 5)")
    s.add_argument("--max-connections", type=int, help="open connections; more get 503 + Retry-After (default: 512)")
    s.add_argument("--heartbeat-file", help="a file rewritten every 5 s while ready, read by the Docker HEALTHCHECK (default: none)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    b = subparsers.add_parser("serve-bench", help="load-test the service; writes outputs/runs/<profile>/bench/service.json",
                              description="Start `spleen-seg serve` on a free local port (or use --url), send N uploads "
                                          "from C threads at once, and record throughput, latency percentiles, 200/503 "
                                          "counts and the server's peak RSS.")
    b.add_argument("--model", help="ONNX file to serve locally (default: outputs/runs/<profile>/model.onnx)")
    b.add_argument("--url", help="a running service instead of a local one")
    b.add_argument("--file", help="the NIfTI to upload (default: the profile dataset's first test image)")
    b.add_argument("--n", type=int, default=12, help="requests (default: 12)")
    b.add_argument("--concurrency", type=int, default=4, help="client threads (default: 4)")
    b.add_argument("--endpoint", default="/predict", choices=["/predict", "/segment"])
    b.add_argument("--max-concurrency", type=int, default=1, help="local server's --max-concurrency (default: 1)")
    b.add_argument("--max-queue", type=int, default=4, help="local server's --max-queue (default: 4)")
    b.add_argument("--sw-roi", type=_csv_ints, help="local server's --sw-roi")
    b.add_argument("--sw-batch-size", type=int, help="local server's --sw-batch-size")
    b.add_argument("--profile", choices=["quick", "full"], default="quick")
    b.add_argument("--out", help="JSON record (default: outputs/runs/<profile>/bench/service.json)")
    b.add_argument("--note", help="a remark stored with the record (e.g. 'random weights')")
    b.set_defaults(func=cmd_serve_bench)
