"""Uploads: a multipart body streamed to a generated temp file, its size limited while it streams,
a slow client cut off (408) without holding the event loop's own slowness against it. Errors a
client sees are :class:`ServiceError` (a message safe to show, no exception text, no paths)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the multipart form field that carries the upload
FIELD = "file"
#: bytes a multipart body may carry beyond the file itself (boundaries, part headers, small fields)
MULTIPART_SLACK = 64 * 1024
#: at most this many parts in one multipart body
MAX_PARTS = 16


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

