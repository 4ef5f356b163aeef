"""``spleen-seg serve`` (the HTTP service, :mod:`spleen_utils.serve`) and ``spleen-seg serve-bench``
(its load test, :mod:`spleen_utils.bench.service_load`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import SpleenError
from .args import csv_ints


def cmd_serve(a: argparse.Namespace) -> int:
    from ..serve import ServiceSettings, serve

    settings = ServiceSettings.from_env(
        model=a.model, device=a.device, max_upload_mb=a.max_upload_mb, max_voxels=a.max_voxels,
        max_concurrency=a.max_concurrency, max_queue=a.max_queue, sw_roi=a.sw_roi, sw_batch_size=a.sw_batch_size,
        tmp_dir=a.tmp_dir, upload_timeout_s=a.upload_timeout_s, upload_grace_s=a.upload_grace_s,
        upload_min_kbps=a.upload_min_kbps, max_uploads=a.max_uploads, inference_timeout_s=a.inference_timeout_s,
        header_timeout_s=a.header_timeout_s, keep_alive_s=a.keep_alive_s, max_connections=a.max_connections,
        heartbeat_file=a.heartbeat_file,
    )
    serve(settings, host=a.host, port=a.port, log_level=a.log_level)  # the port opens once the model is loaded
    return 0


def cmd_serve_bench(a: argparse.Namespace) -> int:
    from ..bench.service_load import default_bench_image, run_bench
    from ..provenance import write_json
    from ..runs import RunDir

    file = Path(a.file) if a.file else default_bench_image(a.profile)
    if file is None:
        raise SpleenError(f"no --file given and no test image in the {a.profile} dataset; run `spleen-seg data synthetic` or pass --file.")
    model = a.model
    if model is None and a.url is None:
        default = RunDir.of(a.profile).onnx
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
    out = write_json(record, Path(a.out) if a.out else RunDir.of(a.profile).bench / "service.json")
    r = record["result"]
    lat = r["latency_s"] or {}
    print(f"{r['n']} requests, {r['concurrency']} at a time: {r['ok']} answered, {r['rejected_503']} busy (503), {r['failed']} failed; "
          f"{r['throughput_rps']} req/s; latency p50 {lat.get('p50')} s, p90 {lat.get('p90')} s, p99 {lat.get('p99')} s")
    print(f"written: {out}")
    return 0 if r["failed"] == 0 else 1


def register(subparsers) -> None:
    """Add ``serve`` and ``serve-bench`` to the ``spleen-seg`` command."""
    from ..serve.settings import ENV_PREFIX

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
    s.add_argument("--sw-roi", type=csv_ints, help="sliding-window size, e.g. 96,96,96 (default: the model's recipe)")
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
    b.add_argument("--sw-roi", type=csv_ints, help="local server's --sw-roi")
    b.add_argument("--sw-batch-size", type=int, help="local server's --sw-batch-size")
    b.add_argument("--profile", choices=["quick", "full"], default="quick")
    b.add_argument("--out", help="JSON record (default: outputs/runs/<profile>/bench/service.json)")
    b.add_argument("--note", help="a remark stored with the record (e.g. 'random weights')")
    b.set_defaults(func=cmd_serve_bench)
