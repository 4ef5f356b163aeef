"""download_msd against a real local HTTP server (no internet): success, idempotence, failures."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleen_utils.data import (
    COMPLETE_MARKER,
    MSD_MD5,
    MSD_TASK,
    MSD_URL,
    download_msd,
    load_datalist,
    msd_is_complete,
)
from spleen_utils.errors import DataError

TIMEOUT = 2.0


# ------------------------------------------------------------------------------------ fixtures


def _nii_bytes(shape=(4, 4, 3), label=False) -> bytes:
    data = (np.arange(np.prod(shape)).reshape(shape) % 2).astype(np.uint8 if label else np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    raw = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": raw})
    img.to_file_map(file_map)
    import gzip

    return gzip.compress(raw.getvalue())


def _msd_tar(top: str | None = MSD_TASK, cases=("spleen_2", "spleen_3"), drop: str | None = None) -> bytes:
    """An MSD-layout tar in memory (``top``: the archive's top folder, None for none)."""
    files: dict[str, bytes] = {}
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    meta = {
        "name": "Spleen",
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(cases),
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/spleen_1.nii.gz"],
    }
    files["dataset.json"] = json.dumps(meta).encode()
    for c in cases:
        files[f"imagesTr/{c}.nii.gz"] = _nii_bytes()
        files[f"labelsTr/{c}.nii.gz"] = _nii_bytes(label=True)
    files["imagesTs/spleen_1.nii.gz"] = _nii_bytes()
    files["imagesTr/._spleen_2.nii.gz"] = b"\x00\x05\x16\x07AppleDouble"  # as in the real archive
    if drop:
        files.pop(drop)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
        for name in ([top] if top else []) + dirs:
            info = tarfile.TarInfo(f"{top}/{name}" if top and name != top else name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class _Server:
    """A real HTTP server on 127.0.0.1 in a thread. ``routes``: path -> (mode, bytes)."""

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # lets a stalled handler finish at teardown
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append(self.path)
                mode, body = server.routes.get(self.path, ("missing", b""))
                if mode == "missing":
                    self.send_error(404, "Not Found")
                    return
                if mode == "redirect":  # body: the address to go to
                    self.send_response(302)
                    self.send_header("Location", body.decode())
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                if mode == "ok":
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif mode == "drop":  # promise more than we send, then hang up mid-body
                    self.send_header("Content-Length", str(len(body) + 100_000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif mode == "stall":  # headers, a few bytes, then silence
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    server.release.wait(10)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.routes[path] = (mode, body)
        return self.url(path)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def msd_tar() -> bytes:
    return _msd_tar()


def _assert_nothing_left(root: Path):
    """No dataset folder, no archive, no scratch: nothing that could be taken for data."""
    assert not (root / MSD_TASK).exists()
    leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert leftovers == [], leftovers


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ tests


def test_constants_are_monais():
    from monai.apps import DecathlonDataset

    assert MSD_URL == DecathlonDataset.resource[MSD_TASK]
    assert MSD_MD5 == DecathlonDataset.md5[MSD_TASK]


def test_download_extracts_msd_layout(server, msd_tar, tmp_path, capsys):
    url = server.serve("/Task09_Spleen.tar", msd_tar)
    root = tmp_path / "data"
    out = download_msd(root, url=url, md5=_md5(msd_tar), progress=True, timeout=TIMEOUT)

    assert out == root / MSD_TASK
    assert sorted(p.name for p in root.iterdir()) == [MSD_TASK]  # no archive, no scratch
    assert {p.name for p in out.iterdir()} >= {"dataset.json", "imagesTr", "labelsTr", "imagesTs", COMPLETE_MARKER}
    assert msd_is_complete(out)
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["url"] == url and marker["md5"] == _md5(msd_tar)
    items = load_datalist(out)
    assert [Path(i["image"]).name for i in items] == ["spleen_2.nii.gz", "spleen_3.nii.gz"]
    assert nib.load(items[0]["label"]).shape == (4, 4, 3)
    assert "Task09_Spleen.tar" in capsys.readouterr().err  # the tqdm bar
    assert server.requests == ["/Task09_Spleen.tar"]


def test_second_call_makes_no_request(server, msd_tar, tmp_path):
    url = server.serve("/Task09_Spleen.tar", msd_tar)
    first = download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False, timeout=TIMEOUT)
    marker = (first / COMPLETE_MARKER).read_text()
    assert len(server.requests) == 1
    server.routes.clear()  # a request now would 404
    second = download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False, timeout=TIMEOUT)
    assert second == first and len(server.requests) == 1
    assert (first / COMPLETE_MARKER).read_text() == marker
    # offline too: an unreachable URL is never contacted once the data is complete
    assert download_msd(tmp_path, url=f"http://127.0.0.1:{_closed_port()}/x.tar", progress=False) == first


def test_archive_without_top_folder_and_without_md5(server, tmp_path):
    body = _msd_tar(top=None)
    url = server.serve("/flat.tar", body)
    with pytest.warns(UserWarning, match="skip md5 check"):  # as MONAI warns when nothing can be verified
        out = download_msd(tmp_path, url=url, md5=None, progress=False, timeout=TIMEOUT)
    assert msd_is_complete(out) and (out / "imagesTr" / "spleen_3.nii.gz").is_file()
    assert json.loads((out / COMPLETE_MARKER).read_text())["md5"] is None


def test_md5_mismatch(server, msd_tar, tmp_path):
    url = server.serve("/Task09_Spleen.tar", msd_tar)
    with pytest.raises(DataError, match=r"MD5 checksum .* did not match.*retry, or pass --url/--md5") as e:
        download_msd(tmp_path, url=url, md5="0" * 32, progress=False, timeout=TIMEOUT)
    assert _md5(msd_tar) in str(e.value)
    _assert_nothing_left(tmp_path)


def test_invalid_md5_is_refused_before_downloading(server, msd_tar, tmp_path):
    url = server.serve("/Task09_Spleen.tar", msd_tar)
    with pytest.raises(DataError, match="not an MD5"):
        download_msd(tmp_path, url=url, md5="abc", progress=False)
    assert server.requests == []


@pytest.mark.parametrize("kind", ["not_a_tar", "truncated_tar"])
def test_corrupt_archive(server, msd_tar, tmp_path, kind):
    body = b"<html>Access denied</html>\n" * 50 if kind == "not_a_tar" else msd_tar[: len(msd_tar) * 2 // 3]
    url = server.serve("/Task09_Spleen.tar", body)
    with pytest.raises(DataError, match="archive is corrupt") as e:
        download_msd(tmp_path, url=url, md5=_md5(body), progress=False, timeout=TIMEOUT)
    assert "\n" not in str(e.value)
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "drop, message",
    [("dataset.json", "holds no Task09_Spleen/dataset.json"), ("labelsTr/spleen_3.nii.gz", "incomplete")],
)
def test_archive_with_wrong_layout(server, tmp_path, drop, message):
    body = _msd_tar(drop=drop)
    url = server.serve("/bad.tar", body)
    with pytest.raises(DataError, match=message):
        download_msd(tmp_path, url=url, md5=_md5(body), progress=False, timeout=TIMEOUT)
    _assert_nothing_left(tmp_path)


def test_dropped_connection(server, msd_tar, tmp_path):
    url = server.serve("/Task09_Spleen.tar", msd_tar, mode="drop")
    with pytest.raises(DataError, match=r"could not download MSD Task09 from .*closed early.*pass --url") as e:
        download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False, timeout=TIMEOUT)
    assert "\n" not in str(e.value)
    _assert_nothing_left(tmp_path)


def test_timeout(server, msd_tar, tmp_path):
    url = server.serve("/Task09_Spleen.tar", msd_tar, mode="stall")
    with pytest.raises(DataError, match=r"could not download MSD Task09 from .*timed out"):
        download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False, timeout=0.3)
    _assert_nothing_left(tmp_path)


def test_unreachable_host(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x.tar"
    with pytest.raises(DataError) as e:
        download_msd(tmp_path, url=url, progress=False, timeout=TIMEOUT)
    msg = str(e.value)
    assert msg.startswith(f"could not download MSD Task09 from {url}: connection refused.")
    assert msg.endswith("Check your network connection, or pass --url to a reachable mirror.")
    _assert_nothing_left(tmp_path)


def test_http_404(server, tmp_path):
    url = server.url("/nowhere/Task09_Spleen.tar")
    with pytest.raises(DataError, match=r"could not download MSD Task09 from .*: HTTP 404 Not Found\."):
        download_msd(tmp_path, url=url, progress=False, timeout=TIMEOUT)
    _assert_nothing_left(tmp_path)


def test_invalid_url(tmp_path):
    with pytest.raises(DataError, match="not a valid URL"):
        download_msd(tmp_path, url="Task09_Spleen.tar", progress=False)


def test_partial_leftovers_are_not_trusted(server, msd_tar, tmp_path):
    """A killed run's half-extracted folder (no marker) and scratch files get replaced."""
    stale = tmp_path / MSD_TASK
    (stale / "imagesTr").mkdir(parents=True)
    (stale / "dataset.json").write_text("{}")
    (stale / "imagesTr" / "half.nii.gz").write_bytes(b"half")
    (tmp_path / f".{MSD_TASK}.tar.part").write_bytes(b"partial bytes")
    (tmp_path / f".{MSD_TASK}.extract").mkdir()
    assert not msd_is_complete(stale)

    url = server.serve("/Task09_Spleen.tar", msd_tar)
    out = download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False, timeout=TIMEOUT)
    assert server.requests == ["/Task09_Spleen.tar"]
    assert msd_is_complete(out) and not (out / "imagesTr" / "half.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MSD_TASK]


def test_failed_download_keeps_an_existing_incomplete_folder(tmp_path):
    stale = tmp_path / MSD_TASK
    stale.mkdir()
    (stale / "dataset.json").write_text("{}")
    with pytest.raises(DataError):
        download_msd(tmp_path, url=f"http://127.0.0.1:{_closed_port()}/x.tar", progress=False, timeout=TIMEOUT)
    assert (stale / "dataset.json").exists() and not msd_is_complete(stale)


# ------------------------------------------------------------------------------------ hardening (#9)


def test_url_keeps_the_known_md5_unless_md5_overrides_it(server, msd_tar, tmp_path, monkeypatch):
    """A mirror serves the same archive: `--url` alone still checks MONAI's MD5 (it used to skip it)."""
    from spleen_utils import cli

    url = server.serve("/Task09_Spleen.tar", msd_tar)  # not MONAI's archive, so MONAI's MD5 cannot match
    assert cli.main(["data", "download", "--root", str(tmp_path / "a"), "--url", url]) == 2
    _assert_nothing_left(tmp_path / "a")
    assert cli.main(["data", "download", "--root", str(tmp_path / "b"), "--url", url, "--md5", _md5(msd_tar)]) == 0
    assert msd_is_complete(tmp_path / "b" / MSD_TASK)


def test_nothing_to_verify_warns_as_monai_does(server, msd_tar, tmp_path):
    from spleen_utils import cli

    url = server.serve("/Task09_Spleen.tar", msd_tar)
    with pytest.warns(UserWarning, match="skip md5 check"):
        assert cli.main(["data", "download", "--root", str(tmp_path), "--url", url, "--md5", "none"]) == 0
    assert json.loads((tmp_path / MSD_TASK / COMPLETE_MARKER).read_text())["md5"] is None


def test_https_to_http_redirect_is_refused():
    import email.message
    import urllib.request

    from spleen_utils.data import _NoDowngradeRedirect

    handler = _NoDowngradeRedirect()
    req = urllib.request.Request("https://mirror.example/Task09_Spleen.tar")
    with pytest.raises(DataError, match="redirected to an unencrypted http address.*https mirror"):
        handler.redirect_request(req, None, 302, "Found", email.message.Message(), "http://evil.example/x.tar")
    # https -> https and http -> http redirects are followed as before
    ok = handler.redirect_request(req, None, 302, "Found", email.message.Message(), "https://other.example/x.tar")
    assert ok.full_url == "https://other.example/x.tar"


def test_http_redirect_is_followed_by_download(server, msd_tar, tmp_path):
    """The opener download_msd uses still follows ordinary redirects (same scheme)."""
    url = server.serve("/Task09_Spleen.tar", msd_tar)
    server.routes["/old.tar"] = ("redirect", url.encode())
    out = download_msd(tmp_path, url=server.url("/old.tar"), md5=_md5(msd_tar), progress=False, timeout=TIMEOUT)
    assert msd_is_complete(out) and server.requests == ["/old.tar", "/Task09_Spleen.tar"]


def test_archive_over_the_extract_cap_is_refused_before_unpacking(server, tmp_path):
    body = _msd_tar()
    url = server.serve("/Task09_Spleen.tar", body)
    with pytest.raises(DataError, match="would unpack to more than"):
        download_msd(tmp_path, url=url, md5=_md5(body), progress=False, timeout=TIMEOUT, max_extract_bytes=100)
    _assert_nothing_left(tmp_path)


def test_a_tar_bomb_declaring_huge_members_is_refused(server, tmp_path):
    """Sizes come from the tar headers: a member declaring 20 GiB is refused without writing a byte."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"{MSD_TASK}/imagesTr/huge.nii")
        info.size = 20 * 2**30
        tar.addfile(info)  # the header only: the declared size is what counts
    body = buf.getvalue()
    assert len(body) < 100_000
    url = server.serve("/bomb.tar", body)
    with pytest.raises(DataError, match="would unpack to more than 16 GiB"):
        download_msd(tmp_path, url=url, md5=_md5(body), progress=False, timeout=TIMEOUT)
    _assert_nothing_left(tmp_path)


def _dataset(tmp_path: Path, entries) -> Path:
    d = tmp_path / "ds"
    (d / "imagesTr").mkdir(parents=True)
    (d / "labelsTr").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (d / sub / "a.nii.gz").write_bytes(_nii_bytes())
    (d / "dataset.json").write_text(json.dumps({"training": entries}))
    return d


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "ABS", "link"])
def test_dataset_json_entries_must_stay_inside_the_dataset(tmp_path, bad):
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(_nii_bytes())
    entry = {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}
    d = _dataset(tmp_path, [entry])
    if bad == "ABS":
        bad = str(outside)
    elif bad == "link":
        (d / "imagesTr" / "link.nii.gz").symlink_to(outside)
        bad = "imagesTr/link.nii.gz"
    (d / "dataset.json").write_text(json.dumps({"training": [entry, {"image": bad, "label": "./labelsTr/a.nii.gz"}]}))
    with pytest.raises(DataError, match="absolute path|leads outside the dataset folder") as e:
        load_datalist(d)
    assert "\n" not in str(e.value)


def test_dataset_json_dotdot_that_stays_inside_is_kept(tmp_path):
    d = _dataset(tmp_path, [{"image": "imagesTr/../imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    (item,) = load_datalist(d)
    assert Path(item["image"]) == (d / "imagesTr" / "a.nii.gz").resolve()


def test_downloaded_archive_listing_a_path_outside_is_refused(server, tmp_path):
    """The archive's own dataset.json is checked the same way before the folder is installed."""
    files = io.BytesIO()
    meta = {"training": [{"image": "../../../etc/passwd", "label": "./labelsTr/a.nii.gz"}]}
    with tarfile.open(fileobj=files, mode="w") as tar:
        for name, data in [("dataset.json", json.dumps(meta).encode()), ("imagesTr/a.nii.gz", _nii_bytes()),
                           ("labelsTr/a.nii.gz", _nii_bytes(label=True))]:
            info = tarfile.TarInfo(f"{MSD_TASK}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = files.getvalue()
    url = server.serve("/evil.tar", body)
    with pytest.raises(DataError, match="leads outside the dataset folder"):
        download_msd(tmp_path, url=url, md5=_md5(body), progress=False, timeout=TIMEOUT)
    _assert_nothing_left(tmp_path)
