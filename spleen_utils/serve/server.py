"""Running the app: the heartbeat file the Docker health check reads, uvicorn's protocol with a
header timeout and a connection cap, uvicorn's options, logging, and :func:`serve` (what
``spleen-seg serve`` runs)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import ServiceSettings

if TYPE_CHECKING:
    from .pipeline import SegmentationService

log = logging.getLogger(__name__)


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
    """The service's log lines (every ``spleen_utils.serve.*`` logger) go to stderr at INFO, unless
    the process has configured logging itself."""
    package = logging.getLogger(__package__)
    if not package.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(h)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


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



def serve(settings: ServiceSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model (failing fast with one sentence: the port opens once it is ready), then run the
    app under uvicorn with :func:`uvicorn_options` until stopped. What ``spleen-seg serve`` runs."""
    import uvicorn

    from .app import create_app
    from .pipeline import SegmentationService

    _configure_logging()
    service = SegmentationService(settings)
    try:
        service.load()
    except BaseException:
        service.close()
        raise
    app = create_app(service=service)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(service.settings))
