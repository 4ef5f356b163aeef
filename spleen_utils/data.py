"""Datasets in the Medical Segmentation Decathlon layout: datalists, splits, checksums.

A dataset folder holds ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and ``imagesTs/``. The
quick profile's synthetic set (:mod:`spleen_utils.synthetic`) and MSD Task09 (downloaded here)
share that layout, so everything downstream reads both the same way.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, SpleenError
from .provenance import utc_now, write_json

if TYPE_CHECKING:
    from .config import Config


def read_dataset_json(dataset_dir: str | Path) -> dict:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "dataset.json"
    if not path.exists():
        raise DataError(
            f"{dataset_dir}: no dataset.json; create the data first "
            "(`spleen-seg data synthetic` for the quick profile, `spleen-seg data download` for MSD)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None


def _resolve(dataset_dir: Path, rel: Any) -> Path:
    """``rel`` inside ``dataset_dir``; an absolute entry, or one that leads outside (``..``, a
    symbolic link), is refused: a dataset.json must not make a run read files elsewhere."""
    where = dataset_dir / "dataset.json"
    if not isinstance(rel, str) or not rel.strip() or "\0" in rel:
        raise DataError(f"{where}: lists {rel!r}, which is not a file path relative to the dataset folder.")
    if os.path.isabs(rel) or rel.startswith(("\\", "~")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: lists the absolute path {rel!r}; entries must be relative to the dataset folder.")
    root = dataset_dir.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise DataError(f"{where}: lists {rel!r}, which leads outside the dataset folder; entries must stay inside it.")
    return path


#: the keys of a datalist entry that name files (others, such as ``source`` and ``fold``, are text)
PATH_KEYS = ("image", "label", "tissue")


def load_datalist(dataset_dir: str | Path, section: str = "training") -> list[dict]:
    """The cases of ``section`` as ``{"image": path, "label": path}`` dicts (``test``: image only).

    Sorted by image file name as the MONAI tutorial does (``sorted(glob(...))``), so the split
    below reproduces its validation set on MSD. MSD's ``dataset.json`` lists files the archive
    does not always hold (hidden ``._`` files aside), so every listed file must exist.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_dataset_json(dataset_dir)
    if section not in meta:
        raise DataError(f"{dataset_dir / 'dataset.json'}: has no {section!r} section.")
    items = []
    for entry in meta[section]:
        if isinstance(entry, str):
            item = {"image": str(_resolve(dataset_dir, entry))}
        else:
            item = {k: str(_resolve(dataset_dir, v)) if k in PATH_KEYS else v for k, v in entry.items()}
        missing = [item[k] for k in PATH_KEYS if k in item and not Path(item[k]).exists()]
        if missing:
            raise DataError(f"{dataset_dir}: dataset.json lists {missing[0]}, which does not exist; the dataset is incomplete.")
        items.append(item)
    return sorted(items, key=lambda d: Path(d["image"]).name)


def split_datalist(items: list[dict], val_cases: int, max_cases: int | None = None) -> tuple[list[dict], list[dict]]:
    """Deterministic split: the last ``val_cases`` of the sorted list validate (MONAI: 9 of 41).

    A generated set whose entries carry a ``fold`` says itself which cases validate.
    """
    if max_cases is not None:
        items = items[:max_cases]
    if any("fold" in i for i in items):
        train = [i for i in items if i.get("fold") != "validation"]
        val = [i for i in items if i.get("fold") == "validation"]
        if not train or not val:
            raise DataError("the dataset's folds leave no training or no validation case.")
        return train, val
    if not 0 < val_cases < len(items):
        raise DataError(f"cannot keep {val_cases} of {len(items)} cases for validation; at least one must train.")
    return items[:-val_cases], items[-val_cases:]


def real_items(names: tuple[str, ...] | list[str], repeats: int = 1) -> list[dict]:
    """Datalist entries of real scans shipped in :mod:`spleen_utils.samples`."""
    from .samples import real_case

    items = []
    for name in names:
        case = real_case(name)
        items += [{"image": str(case.image), "label": str(case.label), "source": f"real:{name}"}] * max(int(repeats), 1)
    return items


def datalists(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The training and validation entries of ``cfg``: its dataset's split plus the real samples it names."""
    items = load_datalist(cfg.dataset_dir, "training")
    train_items, val_items = split_datalist(items, cfg.val_cases, cfg.max_cases)
    train_items = [i for i in train_items if "source" not in i or i["source"].split(":", 1)[0] in cfg.train_sources]
    if not train_items and not cfg.real_train:
        raise SpleenError(f"no training case left: the dataset has none from the sources {list(cfg.train_sources)}.")
    return train_items + real_items(cfg.real_train, cfg.real_repeats), val_items + real_items(cfg.real_val)


def count_sources(items: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[str(i.get("source", "dataset"))] = out.get(str(i.get("source", "dataset")), 0) + 1
    return out


def file_md5(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def dataset_checksums(items: list[dict]) -> dict[str, str]:
    """MD5 of every file a run reads, keyed by file name (recorded in ``run.json``)."""
    out = {}
    for item in items:
        for key in PATH_KEYS:
            if key in item:
                path = item[key]
                out[f"{Path(path).parent.name}/{Path(path).name}"] = file_md5(path)
    return out


# --------------------------------------------------------------------------------------------
# MSD Task09 download (verified, idempotent, never half-extracted)
# --------------------------------------------------------------------------------------------

#: the task folder MSD Task09's archive unpacks to, under ``root``.
MSD_TASK = "Task09_Spleen"
#: the mirror MONAI uses (``monai.apps.DecathlonDataset.resource["Task09_Spleen"]``, MONAI 1.6).
MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
#: MONAI's published MD5 of that archive (``monai.apps.DecathlonDataset.md5["Task09_Spleen"]``).
MSD_MD5 = "410d4a301da4e5b2f6f86ec3ddba524e"
#: written last into a finished dataset folder; a folder without it is not complete.
COMPLETE_MARKER = ".complete"
#: the most bytes an archive may unpack to (MSD Task09: 1.6 GB in 61 files); more is refused unread
MAX_EXTRACT_BYTES = 16 * 2**30
#: the most entries an archive may hold (MSD Task09: under 200)
MAX_EXTRACT_MEMBERS = 100_000

_RETRY_HINT = "Check your network connection, or pass --url to a reachable mirror."


def msd_is_complete(dataset_dir: str | Path) -> bool:
    """True if ``dataset_dir`` was fully downloaded, verified and extracted by :func:`download_msd`."""
    dataset_dir = Path(dataset_dir)
    return (dataset_dir / "dataset.json").is_file() and (dataset_dir / COMPLETE_MARKER).is_file()


class _DirLock:
    """An exclusive advisory lock on a directory (POSIX ``flock``; released if the process dies).

    It keeps two downloads into the same ``root`` from sharing the fixed scratch names below,
    which is what lets a run delete a previous run's leftovers safely. Without ``fcntl``
    (Windows) it does nothing.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_DirLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _download_failed(url: str, reason: str) -> DataError:
    return DataError(f"could not download MSD Task09 from {url}: {reason}. {_RETRY_HINT}")


def _network_reason(err: BaseException, timeout: float) -> str:
    """One short phrase for a network exception (no traceback, no nested reprs)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}".rstrip()
    if isinstance(err, urllib.error.URLError):
        if not isinstance(err.reason, BaseException):
            return str(err.reason)
        err = err.reason
    if isinstance(err, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return f"no response within {timeout:g} s (timed out)"
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed early, after {len(err.partial)} bytes"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror or err})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return str(err) or type(err).__name__


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, except from https to anything but https (the archive would lose TLS)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        from urllib.parse import urljoin, urlsplit

        old, new = urlsplit(req.full_url).scheme.lower(), urlsplit(urljoin(req.full_url, newurl)).scheme.lower()
        if old == "https" and new != "https":
            raise DataError(
                f"could not download MSD Task09 from {req.full_url}: the server redirected to an unencrypted "
                f"{new or 'relative'} address ({newurl}), which is refused; pass --url to an https mirror."
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoDowngradeRedirect)


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``dest``; return the MD5 of what was written. Raises DataError."""
    from tqdm import tqdm  # text bar on stderr (tqdm.auto would be a widget in notebooks)

    digest = hashlib.md5()
    try:
        response = _opener().open(url, timeout=timeout)
    except ValueError as e:  # "unknown url type", malformed URL
        raise DataError(f"cannot download MSD Task09: {url!r} is not a valid URL ({e}).") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, refused, ...
        raise _download_failed(url, _network_reason(e, timeout)) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with open(dest, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{MSD_TASK}.tar",
            disable=not progress,
        ) as bar:
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as e:
                    raise _download_failed(url, _network_reason(e, timeout)) from None
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as e:
                    raise DataError(f"could not write the MSD Task09 archive to {dest}: {e.strerror or e}.") from None
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        # Python's http.client returns a short body without an error when the server hangs up.
        raise _download_failed(url, f"the connection closed early, after {received} of {total} bytes")
    return digest.hexdigest()


def _find_task_root(extracted: Path) -> Path:
    """The folder holding dataset.json: the archive's top folder (MSD: ``Task09_Spleen/``) or itself."""
    if (extracted / "dataset.json").is_file():
        return extracted
    tops = [p for p in extracted.iterdir() if not p.name.startswith("._")]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / "dataset.json").is_file():
        return tops[0]
    named = extracted / MSD_TASK
    if (named / "dataset.json").is_file():
        return named
    raise DataError(f"the downloaded archive is not an MSD dataset: it holds no {MSD_TASK}/dataset.json.")


def _check_layout(task_root: Path) -> None:
    """dataset.json (valid, with its training files present), imagesTr/ and labelsTr/."""
    for sub in ("imagesTr", "labelsTr"):
        if not (task_root / sub).is_dir():
            raise DataError(f"the downloaded archive is not an MSD dataset: it has no {sub}/ folder.")
    try:
        meta = json.loads((task_root / "dataset.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"the downloaded archive is corrupt: its dataset.json is not valid JSON ({e}).") from None
    for entry in meta.get("training", []) if isinstance(meta, dict) else []:
        for key, rel in entry.items() if isinstance(entry, dict) else [("image", entry)]:
            if key not in PATH_KEYS:
                continue
            if not _resolve(task_root, rel).is_file():
                raise DataError(
                    f"the downloaded archive is incomplete: dataset.json lists {rel}, which it does not hold. "
                    "Retry the download, or pass --url/--md5 for a mirror."
                )


def download_msd(
    root: str | Path = "data",
    url: str = MSD_URL,
    md5: str | None = MSD_MD5,
    progress: bool = True,
    timeout: float = 60,
    max_extract_bytes: int = MAX_EXTRACT_BYTES,
) -> Path:
    """Download and extract MSD Task09 into root/Task09_Spleen; returns that folder.

    - Idempotent: a folder that a previous call completed (``dataset.json`` plus the
      ``.complete`` marker, written last) is returned at once, without touching the network.
    - Verified: the archive's MD5 must equal ``md5``, MONAI's published one by default, whatever
      ``url`` is (a mirror serves the same file). ``md5=None`` skips the check with a warning,
      as MONAI does. A redirect from https to http is refused.
    - Bounded: an archive that would unpack to more than ``max_extract_bytes`` (or more than
      ``MAX_EXTRACT_MEMBERS`` entries) is refused before anything is written.
    - Atomic: the archive is streamed to ``root/.Task09_Spleen.tar.part`` and unpacked into
      ``root/.Task09_Spleen.extract/`` (MONAI's ``extractall``, which refuses links and paths
      leaving the folder); only a tree with ``dataset.json``, ``imagesTr/`` and ``labelsTr/`` is
      renamed into place, and the marker comes last. Scratch files are removed on any failure,
      and leftovers of a killed run are removed (or replaced) by the next one.
    - ``url`` may be any URL ``urllib`` opens, ``file:///path/Task09_Spleen.tar`` included.

    Every failure (offline, unreachable host, HTTP error, dropped connection, timeout, checksum
    mismatch, corrupt archive) raises :class:`DataError` with one sentence.
    """
    root = Path(root)
    target = root / MSD_TASK
    if msd_is_complete(target):
        return target
    if md5 is not None:
        md5 = md5.strip().lower()
        if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
            raise DataError(f"{md5!r} is not an MD5 checksum (32 hexadecimal digits).")
    else:  # MONAI's check_hash logs the same: the archive will be used unverified
        warnings.warn(f"Expected md5 is None, skip md5 check for the MSD Task09 archive from {url}: "
                      "nothing can verify the download.", UserWarning, stacklevel=2)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {root}: {e.strerror or e}.") from None

    part = root / f".{MSD_TASK}.tar.part"
    scratch = root / f".{MSD_TASK}.extract"
    old = root / f".{MSD_TASK}.old"
    with _DirLock(root):
        if msd_is_complete(target):  # another process finished while we waited for the lock
            return target
        for leftover in (part, scratch, old):  # a killed run's leftovers: never trusted
            _remove(leftover)
        try:
            actual = _fetch(url, part, timeout, progress)
            if md5 is not None and actual != md5:
                raise DataError(
                    f"the MD5 checksum of the MSD Task09 archive from {url} did not match "
                    f"(expected {md5}, got {actual}); the download is damaged or the file differs: "
                    "retry, or pass --url/--md5 for a mirror."
                )
            scratch.mkdir()
            _check_archive_size(part, max_extract_bytes)
            _extract(part, scratch)
            _remove(part)
            task_root = _find_task_root(scratch)
            _check_layout(task_root)
            if target.exists() or target.is_symlink():  # an incomplete folder (no marker): replace it
                os.replace(target, old)
            os.replace(task_root, target)
            write_json({"url": url, "md5": md5, "actual_md5": actual, "completed": utc_now()}, target / COMPLETE_MARKER)
        except OSError as e:
            raise DataError(f"could not install MSD Task09 into {target}: {e.strerror or e}.") from None
        finally:
            for leftover in (part, scratch, old):
                _remove(leftover)
    return target


def _check_archive_size(archive: Path, max_bytes: int, max_members: int = MAX_EXTRACT_MEMBERS) -> None:
    """Refuse an archive whose entries would unpack to more than ``max_bytes`` (read from its headers)."""
    import gzip
    import lzma
    import tarfile
    import zlib

    total = members = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                members += 1
                total += max(int(member.size), 0)
                if total > max_bytes or members > max_members:
                    raise DataError(
                        f"the downloaded MSD Task09 archive would unpack to more than {max_bytes / 2**30:g} GiB "
                        f"or {max_members:,} files, so it was not unpacked; check --url."
                    )
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError):
        return  # not a readable tar: _extract reports the damage in its own words


def _extract(archive: Path, into: Path) -> None:
    """Unpack a tar / tar.gz with MONAI's ``extractall``; any damage becomes one DataError."""
    import gzip
    import lzma
    import tarfile
    import zlib

    from monai.apps.utils import extractall

    try:
        extractall(archive, into, file_type="tar", has_base=False)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        reason = str(e) if str(e) and "\n" not in str(e) else "not a tar archive"  # tarfile's multi-line report
        raise DataError(f"the downloaded MSD Task09 archive is corrupt ({reason}); retry the download.") from None
    except ValueError as e:  # MONAI refuses links and paths outside the folder
        raise DataError(f"the downloaded MSD Task09 archive is unsafe or corrupt ({e}); retry the download.") from None
