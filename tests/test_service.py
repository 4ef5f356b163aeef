"""The segmentation service: results equal the library's pipeline, bad input is a clear 4xx,
temporary files never outlive a request, and a real uvicorn process stays up under load."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # starlette's TestClient warns that it prefers httpx2 to httpx
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from spleen_utils import cli
from spleen_utils.config import Recipe
from spleen_utils.errors import SpleenError
from spleen_utils.export import export_onnx
from spleen_utils.infer import Predictor
from spleen_utils.io import Volume
from spleen_utils.backends import file_sha256
from spleen_utils.model import build_network, save_checkpoint
from spleen_utils.bench.service_load import LocalServer, RssSampler, load_test
from spleen_utils.serve import (
    FIELD,
    SegmentationService,
    ServiceError,
    ServiceSettings,
    create_app,
    receive_upload,
    sanitize_filename,
    summarize,
)

pytestmark = pytest.mark.slow  # starts real servers and loads them (make test-fast skips it)

ROOT = Path(__file__).resolve().parent.parent
ROI = (64, 64, 32)  # a small sliding window keeps CPU tests quick; the service takes it as a setting
#: an LPS image with an offset origin: orientation, spacing and inversion all have work to do
AFFINE = np.array([[-3.0, 0, 0, 60.0], [0, -3.0, 0, 80.0], [0, 0, 3.0, -100.0], [0, 0, 0, 1]])


def nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE, gz: bool = True, header=None) -> bytes:
    raw = nib.Nifti1Image(array, affine, header=header).to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def ct(shape=(40, 40, 20), seed: int = 0) -> np.ndarray:
    """A tiny CT-like int16 volume (HU): a soft-tissue blob in noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(-100, 60, shape)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    a[(x - 0.2) ** 2 + (y + 0.1) ** 2 + z**2 < 0.25] += 180
    return a.astype(np.int16)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("service_model")
    torch.manual_seed(0)
    save_checkpoint(build_network(Recipe()), Recipe(), d / "m.pt")
    export_onnx(d / "m.pt", d / "m.onnx", validate=False)
    return d / "m.onnx"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("service_image") / "case_1.nii.gz"
    p.write_bytes(nifti_bytes(ct()))
    return p


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the service did not become ready")


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_tmp")
    app = create_app(ServiceSettings(model=model, sw_roi=ROI, tmp_dir=tmp, max_queue=2))
    with TestClient(app) as client:
        wait_ready(client)
        app.state.client = client
        yield app


@pytest.fixture()
def client(app):
    """The shared client; after each test the service's temp folder must be empty and the app healthy."""
    svc: SegmentationService = app.state.service
    yield app.state.client
    assert sorted(os.listdir(svc.tmp_dir)) == [], "a temporary file outlived its request"
    assert app.state.client.get("/health").json()["status"] == "ready"
    assert svc.admitted == 0


def post(client, data: bytes, filename: str = "case.nii.gz", endpoint: str = "/predict", field: str = FIELD):
    return client.post(endpoint, files={field: (filename, data, "application/octet-stream")})


def assert_clean_error(r, status: int, code: str, tmp_dir: Path):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert set(body) == {"detail", "error", "request_id"}
    assert r.headers["x-request-id"] == body["request_id"]
    detail = body["detail"]
    assert detail.endswith(".") and len(detail) < 300
    # nothing of the server leaks: no temp path, no exception class names or tracebacks
    assert str(tmp_dir) not in r.text and "/tmp" not in r.text and "upload-" not in r.text
    assert not re.search(r"Traceback|Error\b|Exception|errno", detail), detail


# ---------------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def reference(model, image_file):
    """The library's own pipeline on the same file: what the service must answer."""
    from spleen_utils.io import load_nifti

    vol = load_nifti(image_file)
    predictor = Predictor.from_path(model, backend="onnx", device="cpu", roi=ROI)
    mask, _ = predictor.predict_volume(vol)
    return vol, mask


def test_predict_answers_the_pipeline_result(client, image_file, reference, model):
    vol, mask = reference
    r = post(client, image_file.read_bytes(), filename="case_1.nii.gz")
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["filename"] == "case_1.nii.gz"
    assert j["spleen_voxels"] == int(mask.sum()) > 0
    assert j["has_spleen"] is True
    assert j["spleen_volume_ml"] == pytest.approx(mask.sum() * 27 / 1000, abs=1e-3)  # 3 mm voxels
    assert j["image"] == {"shape": [40, 40, 20], "spacing_mm": [3.0, 3.0, 3.0], "orientation": "LPS", "dtype": "int16"}
    assert j["bounding_box"] == summarize(mask, vol)["bounding_box"]
    assert j["inference_engine"] == "onnxruntime 1.32.0 CPUExecutionProvider"
    assert j["model_sha256"] == file_sha256(model)
    t = j["timings"]
    assert {"upload_s", "queue_s", "read_s", "preprocess_s", "inference_s", "postprocess_s", "total_s"} <= set(t)
    assert t["total_s"] >= t["inference_s"] > 0


def test_segment_returns_the_mask_on_the_upload_grid(client, image_file, reference):
    _, mask = reference
    r = post(client, image_file.read_bytes(), filename="case_1.nii.gz", endpoint="/segment")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["content-disposition"] == 'attachment; filename="case_1_spleen_mask.nii.gz"'
    assert int(r.headers["x-spleen-voxels"]) == int(mask.sum())
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    assert img.shape == (40, 40, 20)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)


def test_uncompressed_nii_and_a_trailing_singleton_axis_are_accepted(client, reference):
    _, mask = reference
    r = post(client, nifti_bytes(ct(), gz=False), filename="case_1.nii")
    assert r.status_code == 200 and r.json()["spleen_voxels"] == int(mask.sum())
    r = post(client, nifti_bytes(ct()[..., None]), filename="case_1.nii.gz")  # (x, y, z, 1): a 3D image
    assert r.status_code == 200 and r.json()["image"]["shape"] == [40, 40, 20]


def test_summarize_bounding_box_in_voxels_and_world_mm():
    mask = np.zeros((10, 12, 8), np.uint8)
    mask[2:5, 3:9, 1:4] = 1
    vol = Volume(array=np.zeros(mask.shape, np.float32), affine=AFFINE, header=nib.Nifti1Header())
    s = summarize(mask, vol)
    assert s["has_spleen"] and s["spleen_voxels"] == 3 * 6 * 3
    assert s["spleen_volume_ml"] == pytest.approx(54 * 0.027)
    bb = s["bounding_box"]
    assert bb["voxel_min"] == [2, 3, 1] and bb["voxel_max"] == [4, 8, 3]
    # x = 60 - 3 i, y = 80 - 3 j, z = -100 + 3 k
    assert bb["mm_min"] == [48.0, 56.0, -97.0] and bb["mm_max"] == [54.0, 71.0, -91.0]
    empty = summarize(np.zeros_like(mask), vol)
    assert empty == {"has_spleen": False, "spleen_voxels": 0, "spleen_volume_ml": 0.0, "bounding_box": None}


# ---------------------------------------------------------------------------------- bad input


def _rgb() -> bytes:
    a = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nifti_bytes(a)


def _nan(value) -> bytes:
    a = ct().astype(np.float32)
    a[5, 5, 5] = value
    return nifti_bytes(a)


def _header_only(shape, klass=nib.Nifti1Header) -> bytes:
    """A NIfTI header that declares ``shape`` int16 voxels, followed by almost no data."""
    h = klass()
    h.set_data_dtype(np.int16)
    h.set_data_shape(shape)
    return h.binaryblock + b"\0" * 4 + b"\0" * 1024


def _truncated_gz() -> bytes:
    b = nifti_bytes(ct())
    return b[: len(b) // 2]


def _corrupt_gz() -> bytes:
    b = bytearray(nifti_bytes(ct()))
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0xFF
    return bytes(b)


def _gzip_bomb() -> bytes:
    # a valid 40x40x20 image followed by 40 MiB of zeros: about 40 kB compressed
    return gzip.compress(nib.Nifti1Image(ct(), AFFINE).to_bytes() + b"\0" * (40 << 20), compresslevel=1)


def _zero_affine() -> bytes:
    img = nib.Nifti1Image(ct(), AFFINE)
    img.set_sform(np.zeros((4, 4)), code=1)
    img.set_qform(None, code=0)
    return gzip.compress(img.to_bytes())


BAD_UPLOADS = {
    "empty_file": (b"", 400, "empty_file"),
    "png": (b"\x89PNG\r\n\x1a\n" + os.urandom(2000), 422, "not_nifti"),
    "text": (b"hello, this is not an image\n" * 50, 422, "not_nifti"),
    "gzipped_text": (gzip.compress(b"not a nifti header " * 100), 422, "not_nifti"),
    "truncated_gz": (_truncated_gz(), 422, "corrupt_nifti"),
    "corrupt_gz": (_corrupt_gz(), 422, "corrupt_nifti"),
    "truncated_nii": (nifti_bytes(ct(), gz=False)[:20000], 422, "corrupt_nifti"),
    "header_only_gz": (nifti_bytes(ct())[:120], 422, "corrupt_nifti"),
    "gzip_bomb": (_gzip_bomb(), 422, "corrupt_nifti"),
    "absurd_dims": (_header_only((30000, 30000, 30000)), 422, "image_too_large"),
    "over_service_voxel_limit": (_header_only((2048, 2048, 128)), 422, "image_too_large"),
    "nifti2_int64_overflow": (_header_only((2**22, 2**22, 2**22), nib.Nifti2Header), 422, "image_too_large"),
    "2d": (nifti_bytes(ct()[:, :, 0]), 422, "unsupported_image"),
    "4d": (nifti_bytes(np.stack([ct()] * 3, axis=-1)), 422, "unsupported_image"),
    "5d": (nifti_bytes(ct()[..., None, None].repeat(2, axis=3).repeat(2, axis=4)), 422, "unsupported_image"),
    "rgb": (_rgb(), 422, "unsupported_image"),
    "complex": (nifti_bytes(np.zeros((8, 8, 8), np.complex64)), 422, "unsupported_image"),
    "nan": (_nan(np.nan), 422, "non_finite_voxels"),
    "inf": (_nan(-np.inf), 422, "non_finite_voxels"),
    "zero_affine": (_zero_affine(), 422, "bad_geometry"),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/segment"])
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_clear_4xx(client, app, case, endpoint):
    data, status, code = BAD_UPLOADS[case]
    r = post(client, data, filename=f"{case}.nii.gz", endpoint=endpoint)
    assert_clean_error(r, status, code, app.state.service.tmp_dir)


def test_absurd_header_is_refused_before_any_voxel_is_read(client, app, monkeypatch):
    from spleen_utils.serve import pipeline

    def no_voxels(*a, **k):
        raise AssertionError("voxels were read")

    monkeypatch.setattr(pipeline, "read_volume", no_voxels)
    r = post(client, _header_only((30000, 30000, 30000)))
    assert_clean_error(r, 422, "image_too_large", app.state.service.tmp_dir)
    assert "30000x30000x30000" in r.json()["detail"]


def test_empty_body(client, app):
    r = client.post("/predict")
    assert_clean_error(r, 400, "empty_body", app.state.service.tmp_dir)
    assert "'file'" in r.json()["detail"]


def test_not_multipart(client, app, image_file):
    r = client.post("/predict", content=image_file.read_bytes(), headers={"content-type": "application/gzip"})
    assert_clean_error(r, 415, "not_multipart", app.state.service.tmp_dir)


def test_malformed_multipart(client, app):
    r = client.post("/predict", content=b"garbage without boundaries" * 10,
                    headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert r.status_code == 400 and r.json()["error"] in ("bad_multipart", "missing_file_field")
    r = client.post("/predict", content=b"x" * 10, headers={"content-type": "multipart/form-data"})
    assert_clean_error(r, 400, "bad_multipart", app.state.service.tmp_dir)


def test_wrong_field_name_is_422_naming_the_field(client, app, image_file):
    r = post(client, image_file.read_bytes(), field="image")
    assert_clean_error(r, 422, "missing_file_field", app.state.service.tmp_dir)
    assert "'file'" in r.json()["detail"] and "'image'" in r.json()["detail"]
    r = client.post("/predict", data={"comment": "no file here"})  # a form without any file
    assert r.status_code in (415, 422)


def test_two_files_are_refused(client, app, image_file):
    data = image_file.read_bytes()
    r = client.post("/predict", files=[(FIELD, ("a.nii.gz", data)), (FIELD, ("b.nii.gz", data))])
    assert_clean_error(r, 400, "too_many_files", app.state.service.tmp_dir)


def test_upload_over_the_limit_is_413_from_content_length(client, app, monkeypatch):
    svc = app.state.service
    monkeypatch.setattr(svc.settings, "max_upload_mb", 0.01)  # 10 KiB
    r = post(client, b"\0" * 200_000)
    assert_clean_error(r, 413, "upload_too_large", svc.tmp_dir)


class _ChunkedRequest:
    """A request whose body arrives in chunks (one every ``every`` s), with no Content-Length; counts
    what was read. Like uvicorn's, its ``receive()`` may be cancelled without losing a byte."""

    HEAD = b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="big.nii"\r\n\r\n'

    def __init__(self, chunks: int, size: int = 64 * 1024, every: float = 0.0):
        self.headers = {"content-type": "multipart/form-data; boundary=BOUNDARY"}
        self.chunks, self.size, self.every, self.read = chunks, size, every, 0
        self._next = 0
        self._t0: float | None = None

    async def receive(self):
        import anyio

        if self._t0 is None:
            self._t0 = time.monotonic()
        if self._next == 0:
            self._next = 1
            return {"type": "http.request", "body": self.HEAD, "more_body": True}
        if self._next > self.chunks:
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep(max(0.0, self._t0 + self._next * self.every - time.monotonic()))
        self._next += 1
        self.read += 1
        return {"type": "http.request", "body": b"\1" * self.size, "more_body": True}


def test_upload_limit_is_enforced_while_streaming(tmp_path):
    import anyio

    req = _ChunkedRequest(chunks=1000)  # 64 MB offered
    with pytest.raises(ServiceError) as e:
        anyio.run(receive_upload, req, tmp_path, 1 << 20)  # 1 MiB limit
    assert e.value.status == 413
    assert req.read <= 18  # stopped right after the first MiB, not after reading everything
    assert list(tmp_path.iterdir()) == []


class _StalledRequest(_ChunkedRequest):
    def __init__(self, chunks: int):
        super().__init__(chunks, every=10.0)


def test_a_stalled_upload_is_cut_off_and_its_file_removed(tmp_path):
    import anyio

    async def receive():
        with anyio.fail_after(0.3):  # what the endpoint does with --upload-timeout
            await receive_upload(_StalledRequest(chunks=5), tmp_path, 1 << 20)

    with pytest.raises(TimeoutError):
        anyio.run(receive)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, shown",
    [
        ("../../etc/passwd.nii.gz", "passwd.nii.gz"),
        ("C:\\Users\\x\\..\\ct scan (1).nii", "ct_scan_1_.nii"),
        ("/abs/path/.hidden.nii.gz", "hidden.nii.gz"),
        ("..", "upload"),
        ("", "upload"),
        (None, "upload"),
        ("ﬁle\u202e\x00.nii.gz", "file_.nii.gz"),
        ("a" * 500 + ".nii.gz", "a" * 128),
    ],
)
def test_sanitize_filename(name, shown):
    assert sanitize_filename(name) == shown


def test_filename_with_path_components_is_never_a_path(client, app, image_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = post(client, image_file.read_bytes(), filename="../../escape/evil.nii.gz")
    assert r.status_code == 200 and r.json()["filename"] == "evil.nii.gz"
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "escape").exists()


def test_internal_errors_are_logged_not_echoed(app, image_file, monkeypatch, caplog):
    svc = app.state.service

    def boom(vol):
        raise RuntimeError(f"secret detail {svc.tmp_dir}")

    monkeypatch.setattr(svc.predictor, "predict_volume", boom)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: the loaded service is reused
    with caplog.at_level(logging.ERROR, logger="spleen_utils.serve"):
        r = post(client, image_file.read_bytes())
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal" and "secret" not in r.text and str(svc.tmp_dir) not in r.text
    assert "secret detail" in caplog.text and body["request_id"] in caplog.text
    assert os.listdir(svc.tmp_dir) == []
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------- load, health, version


def test_busy_service_answers_503_with_retry_after_before_reading(client, app, image_file, monkeypatch):
    svc = app.state.service
    monkeypatch.setattr(svc, "admitted", svc.settings.max_concurrency + svc.settings.max_queue)
    r = post(client, image_file.read_bytes())
    assert r.status_code == 503 and r.json()["error"] == "busy"
    assert int(r.headers["retry-after"]) >= 1
    assert client.get("/health").status_code == 200  # health is not queued
    monkeypatch.setattr(svc, "admitted", 0)


def test_version_and_docs(client, model):
    v = client.get("/version").json()
    assert v["status"] == "ready"
    assert v["model"]["sha256"] == file_sha256(model) and v["model"]["file"] == "m.onnx"
    assert v["model"]["recipe"]["pixdim"] == [1.5, 1.5, 2.0] and v["model"]["labels"] == ["background", "spleen"]
    assert v["sliding_window"]["roi"] == list(ROI)
    assert v["libraries"]["onnxruntime"] == "1.32.0" and "fastapi" in v["libraries"]
    assert str(model.parent) not in json.dumps(v)  # the model's file name, not its path
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == [FIELD] and body["properties"][FIELD]["format"] == "binary"
    assert {"/predict", "/segment", "/health", "/version"} <= set(spec["paths"])


def test_factory_reads_env_and_health_is_503_until_the_model_is_loaded(model, image_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLEEN_MODEL", str(model))
    monkeypatch.setenv("SPLEEN_SW_ROI", "64,64,32")
    monkeypatch.setenv("SPLEEN_MAX_QUEUE", "7")
    monkeypatch.setenv("SPLEEN_TMP_DIR", str(tmp_path / "svc"))
    release = threading.Event()
    real_load = SegmentationService.load

    def slow_load(self):
        assert release.wait(60)
        real_load(self)

    monkeypatch.setattr(SegmentationService, "load", slow_load)
    app = create_app()  # what `uvicorn --factory spleen_utils.serve:create_app` calls
    svc = app.state.service
    assert svc.settings.max_queue == 7 and svc.settings.sw_roi == (64, 64, 32) and svc.settings.model == model
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
        r = post(client, image_file.read_bytes())
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        release.set()
        wait_ready(client)
        assert client.get("/health").json()["status"] == "ready"
        assert post(client, image_file.read_bytes()).status_code == 200
        assert os.listdir(tmp_path / "svc") == []


def test_unloadable_model_keeps_health_503(tmp_path, caplog):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    app = create_app(ServiceSettings(model=bad))
    with caplog.at_level(logging.ERROR, logger="spleen_utils.serve"), TestClient(app) as client:
        deadline = time.monotonic() + 60
        while app.state.service.state == "loading" and time.monotonic() < deadline:
            time.sleep(0.1)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        assert str(tmp_path) not in r.text
        assert client.post("/predict", files={FIELD: ("x.nii.gz", b"x")}).status_code == 503
    assert "could not be loaded" in caplog.text


def test_settings_from_env_reject_bad_values():
    with pytest.raises(SpleenError, match="SPLEEN_MAX_QUEUE"):
        ServiceSettings.from_env({"SPLEEN_MAX_QUEUE": "many"})
    with pytest.raises(SpleenError, match="max_concurrency"):
        ServiceSettings.from_env({"SPLEEN_MAX_CONCURRENCY": "0"})
    s = ServiceSettings.from_env({"SPLEEN_MAX_UPLOAD_MB": "2.5", "SPLEEN_LCC": "false"}, max_queue=3)
    assert s.max_upload_bytes == int(2.5 * 2**20) and s.lcc is False and s.max_queue == 3


def test_cli_serve_fails_fast_on_a_missing_model(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path / "none.onnx"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "no such model file" in err and err.count("\n") == 1


def test_real_server_under_concurrent_load(model, image_file, tmp_path):
    """`spleen-seg serve` (the Docker image's command) in its own process, 10 uploads at once,
    one inference at a time and two waiting: each gets the right answer or a 503, none is lost,
    /health answers during inference, the server's memory stays bounded and no temp file remains."""
    svc_tmp = tmp_path / "svc"
    args = ["--max-concurrency", "1", "--max-queue", "2", "--sw-roi", "64,64,32", "--tmp-dir", str(svc_tmp),
            "--upload-timeout", "3", "--log-level", "warning"]
    with LocalServer(model, args=args) as server:
        import httpx

        warm = httpx.post(server.url + "/predict", files={FIELD: ("case_1.nii.gz", image_file.read_bytes())}, timeout=120)
        assert warm.status_code == 200
        expected = warm.json()["spleen_voxels"]
        health: list[tuple[int, int]] = []
        stop = threading.Event()

        def poll_health():
            with httpx.Client(base_url=server.url, timeout=10) as c:
                while not stop.is_set():
                    r = c.get("/health")
                    health.append((r.status_code, r.json()["running"]))
                    stop.wait(0.1)

        answers: list[tuple[object, dict | None, str | None]] = []

        def on_response(i, status, seconds, resp):
            body = resp.json() if resp is not None and resp.headers.get("content-type") == "application/json" else None
            answers.append((status, body, resp.headers.get("retry-after") if resp is not None else None))

        poller = threading.Thread(target=poll_health, daemon=True)
        with RssSampler(server.pid) as rss:
            idle = rss.rss()
            poller.start()
            result = load_test(server.url, image_file, n=10, concurrency=10, on_response=on_response, timeout=300)
            stop.set()
            poller.join(timeout=20)
        slow = _stalled_upload(server.port, wait=10)
        out = server.output()

        # the bench command against the same server writes its JSON record
        record_path = tmp_path / "service.json"
        proc = subprocess.run(
            [*_cli(), "serve-bench", "--url", server.url, "--file", str(image_file), "--n", "3", "--concurrency", "2",
             "--out", str(record_path)], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        record = json.loads(record_path.read_text())

    print(f"load: {result['status_counts']}, health polls {len(health)}, rss idle {idle / 2**20:.0f} MB, peak {rss.peak / 2**20:.0f} MB")
    statuses = [a[0] for a in answers]
    assert len(answers) == 10 and result["ok"] + result["rejected_503"] == 10 and result["failed"] == 0, (result, out[-2000:])
    assert set(statuses) <= {200, 503}
    assert result["ok"] >= 1 and result["rejected_503"] >= 1, result  # capacity 3 < 10 at once
    for status, body, retry in answers:
        if status == 200:
            assert body["spleen_voxels"] == expected and body["filename"] == "case_1.nii.gz"
        else:
            assert body["error"] == "busy" and int(retry) >= 1
    assert health and all(code == 200 for code, _ in health)
    assert any(running >= 1 for _, running in health), "no /health answer arrived while an inference ran"
    assert rss.peak < idle + 600 * 2**20, (idle, rss.peak)
    assert list(svc_tmp.iterdir()) == []
    assert slow.startswith("HTTP/1.1 408") and '"error":"upload_timeout"' in slow, slow
    assert "Traceback" not in out
    r = record["result"]
    assert record["kind"] == "service_load_test" and r["n"] == 3 and r["ok"] + r["rejected_503"] == 3
    assert r["latency_s"]["p50"] > 0 and record["inference_engine"].startswith("onnxruntime")


def _stalled_upload(port: int, wait: float) -> str:
    """Start a multipart upload, send part of it, stall; return what the server answers meanwhile."""
    import socket

    body_start = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\n' + b"\0" * 1000
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body_start)
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    return data.decode(errors="replace")


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "spleen-seg"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "spleen_utils.cli"]


# ---------------------------------------------------------------------------------- Docker


def _pins() -> dict[str, str]:
    """Every ``"name==version"`` pin in pyproject.toml (tomllib is Python 3.11+; the project allows 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text)}


def _locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, [sha256, ...])`` of a pip requirements file written with hashes."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)\s*$", line)
        assert m, f"not pinned with hashes: {line!r}"
        out[m.group(1).lower()] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return out


def test_dockerfile_is_small_pinned_non_root_and_healthchecked():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    base = re.compile(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?$")
    assert froms and all(base.match(ln.split()[1]) or ln.split()[1] in {"base", "service"} for ln in froms)
    if "@sha256:" not in froms[0]:  # not pinned yet: the file says how to pin it
        assert "docker buildx imagetools inspect python:3.11-slim" in text
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1].split()[1] not in ("root", "0")
    health = [ln for ln in lines if ln.startswith("HEALTHCHECK")]
    assert health and "check_heartbeat" in health[0] and "SPLEEN_HEARTBEAT_FILE=" in text
    cmd = [ln for ln in lines if ln.startswith("CMD ") and "spleen-seg" in ln][-1]
    assert "serve" in cmd
    assert "SPLEEN_MODEL=/models/model.onnx" in text
    # one pip command installs every package from the hash-locked file, nothing unpinned besides
    pip = [ln for ln in lines if "pip install" in ln]
    assert pip[0].split("RUN ", 1)[1] == "pip install --require-hashes --no-deps -r requirements-docker.txt", pip
    assert all("--no-deps ." in ln or ln == pip[0] for ln in pip), pip  # the package itself, no dependencies
    assert "COPY requirements-docker.txt" in text


def test_docker_requirements_are_hash_locked_and_equal_pyproject_pins():
    req = ROOT / "requirements-docker.txt"
    text = req.read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text and "--only-binary :all:" in text
    locked = _locked(req)
    pins = _pins()
    assert locked["torch"][0] == f"{pins['torch']}+cpu"
    needed = {"monai", "nibabel", "numpy", "scipy", "scikit-image", "onnxruntime", "fastapi", "uvicorn", "python-multipart"}
    assert needed <= set(locked)
    for name in needed:
        assert locked[name][0] == pins[name], name
    for name, (version, hashes) in locked.items():  # every package, dependencies included
        assert hashes, name
    assert not {"matplotlib", "jupyter", "onnx", "nvidia-cudnn-cu12"} & set(locked)  # book and CUDA stay out
    # the wheel this machine has is the one locked (when it is here)
    wheel = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    if wheel.exists():
        import hashlib

        with open(wheel, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() in locked["torch"][1]


def test_dockerignore_keeps_data_and_builds_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    entries = {ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")}
    for needed in ("data", "outputs", ".venv", ".git", "_build", "cpp/build"):
        assert needed in entries or f"/{needed}" in entries or f"**/{needed}" in entries, needed


# ---------------------------------------------------------------------------------- slow and many clients (#9)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"SPLEEN_MAX_UPLOAD_MB": "inf"}, "max_upload_mb"),
        ({"SPLEEN_MAX_UPLOAD_MB": "nan"}, "max_upload_mb"),
        ({"SPLEEN_MAX_UPLOAD_MB": "-1"}, "max_upload_mb"),
        ({"SPLEEN_MAX_UPLOAD_MB": "0"}, "max_upload_mb"),
        ({"SPLEEN_UPLOAD_TIMEOUT_S": "inf"}, "upload_timeout_s"),
        ({"SPLEEN_INFERENCE_TIMEOUT_S": "nan"}, "inference_timeout_s"),
        ({"SPLEEN_UPLOAD_MIN_KBPS": "-5"}, "upload_min_kbps"),
        ({"SPLEEN_MAX_QUEUE": "-1"}, "max_queue"),
        ({"SPLEEN_MAX_CONNECTIONS": "0"}, "max_connections"),
        ({"SPLEEN_HEADER_TIMEOUT_S": "1e309"}, "header_timeout_s"),
    ],
)
def test_settings_must_be_finite_and_in_range(env, name):
    with pytest.raises(SpleenError) as e:
        ServiceSettings.from_env(env)
    msg = str(e.value)
    assert msg.startswith(name) and f"SPLEEN_{name.upper()}" in msg and msg.endswith(".") and ". " not in msg and "\n" not in msg, msg
    with pytest.raises(SpleenError):  # the same check for values given in code
        ServiceSettings(**{name: float(next(iter(env.values())))}).validate()


def test_cli_serve_refuses_an_infinite_upload_limit_with_one_sentence(model, capsys, monkeypatch):
    monkeypatch.setenv("SPLEEN_MAX_UPLOAD_MB", "inf")
    assert cli.main(["serve", "--model", str(model), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "SPLEEN_MAX_UPLOAD_MB" in err and "finite" in err and err.count("\n") == 1, err
    monkeypatch.delenv("SPLEEN_MAX_UPLOAD_MB")
    assert cli.main(["serve", "--model", str(model), "--port", "1", "--inference-timeout", "-3"]) == 2
    assert "--inference-timeout" in capsys.readouterr().err


class _TrickleRequest(_ChunkedRequest):
    """A client that sends 10 bytes every ``every`` seconds, for ever."""

    def __init__(self, every: float):
        super().__init__(chunks=10**6, size=10, every=every)


def test_a_trickling_upload_is_cut_off_by_the_minimum_rate(tmp_path):
    """A slow-loris client (10 bytes every 50 ms) is cut off soon after the grace period, well before
    the overall upload timeout, with 408 and no file left."""
    import anyio

    t0 = time.monotonic()
    with pytest.raises(ServiceError) as e:
        anyio.run(lambda: receive_upload(_TrickleRequest(0.05), tmp_path, 1 << 20, timeout_s=60, grace_s=0.5,
                                         min_bytes_per_s=4096))
    took = time.monotonic() - t0
    assert e.value.status == 408 and e.value.code == "upload_timeout" and "KiB/s" in e.value.message
    assert 0.5 <= took < 5, took
    assert list(tmp_path.iterdir()) == []


def test_a_steady_upload_above_the_minimum_rate_is_not_cut_off(tmp_path):
    import anyio

    steady = _ChunkedRequest(chunks=50, every=0.02)  # 64 KiB per 20 ms: ~3 MiB/s, for ~1 s in all
    up = anyio.run(lambda: receive_upload(steady, tmp_path, 8 << 20, timeout_s=60, grace_s=0.2,
                                          min_bytes_per_s=256 * 1024))
    assert up.size == 50 * 64 * 1024
    up.remove()


def test_an_upload_holds_no_inference_slot_while_it_streams(app, image_file, monkeypatch):
    """While an upload streams in, the inference queue is not taken: with every upload place but
    one held by slow uploads, a complete upload is still served (it used to get 503 busy)."""
    svc = app.state.service
    monkeypatch.setattr(svc.settings, "max_queue", 0)
    monkeypatch.setattr(svc.settings, "max_uploads", 6)
    monkeypatch.setattr(svc, "uploading", 5)  # five slow clients still trickling their bodies
    r = post(app.state.client, image_file.read_bytes())
    assert r.status_code == 200, r.text
    assert svc.admitted == 0 and svc.uploading == 5
    monkeypatch.setattr(svc, "uploading", 6)  # every upload place taken: 503 + Retry-After, nothing read
    r = post(app.state.client, image_file.read_bytes())
    assert r.status_code == 503 and r.json()["error"] == "busy" and int(r.headers["retry-after"]) >= 1
    monkeypatch.setattr(svc, "uploading", 0)
    assert os.listdir(svc.tmp_dir) == []


def test_inference_past_its_time_limit_is_stopped_and_answered_503(app, image_file, monkeypatch):
    svc = app.state.service
    backend = svc.predictor.backend
    calls: list[float] = []
    real = backend._backend

    class Slow:  # the real backend, 0.6 s slower per network call
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, x):
            calls.append(time.monotonic())
            time.sleep(0.6)
            return real(x)

    monkeypatch.setattr(backend, "_backend", Slow())
    monkeypatch.setattr(svc.settings, "inference_timeout_s", 0.2)
    t0 = time.monotonic()
    r = post(app.state.client, image_file.read_bytes(), endpoint="/segment")
    took = time.monotonic() - t0
    assert_clean_error(r, 503, "inference_timeout", svc.tmp_dir)
    assert int(r.headers["retry-after"]) >= 1 and "0.2 s" in r.json()["detail"]
    n = len(calls)
    # the network call in flight at the deadline finishes (0.6 s + the real call, longer on a busy
    # machine); then the thread must stop: no further call, its place given back
    deadline = time.monotonic() + 30
    while svc.running and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)  # longer than one slowed call: a thread that went on would have made another
    assert len(calls) == n, "the inference thread kept running after its request timed out"
    assert took < 10, took
    assert svc.admitted == 0 and svc.running == 0 and os.listdir(svc.tmp_dir) == []
    monkeypatch.setattr(backend, "_backend", real)
    monkeypatch.setattr(svc.settings, "inference_timeout_s", 600.0)
    assert post(app.state.client, image_file.read_bytes()).status_code == 200  # the slot was given back


def test_segment_never_changes_the_process_umask(client, image_file, monkeypatch):
    """Writing the mask must not flip the umask (a process-wide setting) while other threads run."""
    def no_umask(*a):
        raise AssertionError("os.umask was called while the service runs")

    monkeypatch.setattr(os, "umask", no_umask)
    r = post(client, image_file.read_bytes(), endpoint="/segment")
    assert r.status_code == 200, r.text
    assert nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).shape == (40, 40, 20)


def test_heartbeat_file_is_fresh_while_ready(model, tmp_path):
    from spleen_utils.serve import check_heartbeat

    beat = tmp_path / "beat.json"
    ok, msg = check_heartbeat(beat)
    assert not ok and "no readable heartbeat" in msg
    app = create_app(ServiceSettings(model=model, sw_roi=ROI, tmp_dir=tmp_path / "svc", heartbeat_file=beat))
    with TestClient(app) as c:
        wait_ready(c)
        deadline = time.monotonic() + 30
        while not check_heartbeat(beat)[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert check_heartbeat(beat)[0], check_heartbeat(beat)
        os.utime(beat, (time.time() - 60, time.time() - 60))
        ok, msg = check_heartbeat(beat)
        assert not ok and "stalled" in msg
    assert not beat.exists()  # removed at shutdown: a stopped service is never healthy


def _half_open(port: int, n: int, partial: bytes) -> list:
    import socket

    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(partial)
        socks.append(s)
    return socks


def _closed_by_server(sock, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (TimeoutError, OSError) as e:
        return not isinstance(e, TimeoutError)


def test_real_server_under_slow_and_many_clients(model, image_file, tmp_path):
    """`spleen-seg serve` with small limits: half-open connections are closed after the header
    timeout, connections beyond the cap get 503 JSON + Retry-After, slow uploads do not block a
    real one, the heartbeat stays fresh throughout, and every upload of a burst gets 200 or 503
    with Retry-After."""
    import httpx

    from spleen_utils.serve import check_heartbeat

    beat = tmp_path / "beat.json"
    args = ["--max-concurrency", "1", "--max-queue", "1", "--max-uploads", "8", "--max-connections", "24",
            "--header-timeout", "2", "--upload-grace", "1", "--upload-min-kbps", "16", "--sw-roi", "64,64,32",
            "--tmp-dir", str(tmp_path / "svc"), "--heartbeat-file", str(beat), "--log-level", "warning"]
    data = image_file.read_bytes()
    with LocalServer(model, args=args) as server:
        assert check_heartbeat(beat)[0]
        # 1. five slow-loris uploads, then a real one: served, and the slow ones are cut off
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                b"Content-Length: 100000\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.nii\"\r\n\r\n")
        slow = _half_open(server.port, 5, head)
        r = httpx.post(server.url + "/predict", files={FIELD: ("case_1.nii.gz", data)}, timeout=120)
        assert r.status_code == 200, r.text
        answers = []
        for s in slow:
            s.settimeout(10)
            got = b""
            with contextlib.suppress(OSError):
                while b"}" not in got:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            answers.append(got)
            s.close()
        assert all(a.startswith(b"HTTP/1.1 408") and b"upload_timeout" in a for a in answers), answers
        # how long a slow-loris client holds on: about --upload-grace (1 s here)
        t0 = time.monotonic()
        (s,) = _half_open(server.port, 1, head)
        s.settimeout(10)
        first = s.recv(4096)
        cut_after = time.monotonic() - t0
        s.close()
        assert first.startswith(b"HTTP/1.1 408") and 0.9 < cut_after < 5, (first, cut_after)

        # 2. 30 half-sent request lines: over the cap of 24, the rest get 503 JSON + Retry-After;
        #    /health fails meanwhile, the heartbeat does not, and all are closed after 2 s
        t0 = time.monotonic()
        socks = _half_open(server.port, 30, b"GET /health HTTP/1.1\r\nHost:")
        r = httpx.get(server.url + "/health", timeout=5)
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "5"
        assert check_heartbeat(beat)[0]
        closed = [_closed_by_server(s, 6) for s in socks]
        half_open_closed_after = time.monotonic() - t0
        for s in socks:
            s.close()
        assert all(closed)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200

        # 3. a burst of 24 uploads at once: each gets 200, or 503 with Retry-After; none is lost
        answers3: list[tuple[object, object]] = []

        def on_response(i, status, seconds, resp):
            answers3.append((status, resp.headers.get("retry-after") if resp is not None else None))

        result = load_test(server.url, image_file, n=24, concurrency=24, on_response=on_response, timeout=300)
        out = server.output()
    print(f"slow uploads cut off after {cut_after:.1f} s; half-open connections closed after "
          f"{half_open_closed_after:.1f} s; burst: {result['status_counts']}")
    assert result["failed"] == 0 and result["ok"] >= 1, (result, out[-2000:])
    assert all(s == 200 or (s == 503 and r is not None and int(r) >= 1) for s, r in answers3), answers3
    assert list((tmp_path / "svc").iterdir()) == []
    assert "Traceback" not in out


# ----------------------------------------------------------------------------------------------
# hostile headers and resampling bombs (issue #9): 422 with one sentence, never a 500


@pytest.mark.parametrize("name,code", [
    ("ext_size_7", "bad_header"), ("ext_size_negative", "bad_header"), ("ext_over_cap", "bad_header"),
    ("bad_datatype", "bad_header"), ("negative_vox_offset", "bad_header"), ("nan_sform", "bad_header"),
    ("bad_magic", "not_nifti"), ("ext_truncated", "corrupt_nifti"),
    ("spacing_400mm_16cube", "unsupported_image"), ("spacing_1.6e7mm_2cube", "unsupported_image"),
])
def test_hostile_corpus_is_a_clear_422(client, app, tmp_path, name, code):
    from hostile_corpus import hostile_corpus

    case = {c.name: c for c in hostile_corpus(tmp_path)}[name]
    r = post(client, case.path.read_bytes(), filename=case.path.name)
    assert_clean_error(r, 422, code, app.state.service.tmp_dir)
    assert re.search(case.match, r.json()["detail"]), r.json()


def test_a_starved_event_loop_does_not_cut_off_its_clients(tmp_path):
    """CPU starvation: the event loop stalls for 1.5 s (here a blocking call) while a client sends at a
    good rate. The stall is the server's, so its length extends the upload deadline: no 408."""
    import anyio

    async def main():
        req = _ChunkedRequest(chunks=12, size=4096, every=0.05)  # 80 KiB/s for 0.6 s

        async def stall():
            await anyio.sleep(0.05)
            time.sleep(1.5)  # the loop gets no CPU: nothing runs, not even the deadline's timer

        async with anyio.create_task_group() as tg:
            tg.start_soon(stall)
            up = await receive_upload(req, tmp_path, 1 << 20, timeout_s=1.0, grace_s=0.3, min_bytes_per_s=16 * 1024)
        return up

    up = anyio.run(main)
    assert up.size == 12 * 4096
    up.remove()
    # the same client with nothing to blame on the server is still cut off at the hard limit
    with pytest.raises(ServiceError) as e:
        anyio.run(lambda: receive_upload(_StalledRequest(chunks=5), tmp_path, 1 << 20, timeout_s=0.5))
    assert e.value.status == 408 and "0.5 s" in e.value.message
    assert list(tmp_path.iterdir()) == []
