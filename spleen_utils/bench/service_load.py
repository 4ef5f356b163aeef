"""Load-testing the HTTP service (:mod:`spleen_utils.serve`): ``spleen-seg serve`` started in a
subprocess on a free local port (:class:`LocalServer`), its peak memory sampled (:class:`RssSampler`),
N uploads sent from C threads at once (:func:`load_test`), and the whole record that
``spleen-seg serve-bench`` writes (:func:`run_bench`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import SpleenError
from ..provenance import utc_now
from ..serve.uploads import FIELD


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
    from ..config import get_config

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

    from ..io import load_nifti

    vol = load_nifti(file)
    record: dict[str, Any] = {
        "kind": "service_load_test",
        "date": utc_now(),
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
