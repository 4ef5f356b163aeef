"""The run folder: what training writes, what every later stage reads, and training a profile once.

A run lives in ``outputs/runs/<name>/`` (``Config.out_dir``)::

    best_model.pt    the checkpoint with the best validation Dice (self-describing)
    last.pt          the full training state, for an exact resume
    metrics.jsonl    one line per epoch
    summary.json     written when training finishes
    run.json         the configuration, data checksums, versions and hardware
    model.onnx       the exported network (+ model.engine on a GPU with TensorRT)
    export.json      the exporter's report
    predictions/     masks on each input's own grid
    eval/            Dice records (validation.json, real.json, backends.json)
    bench/           benchmark records
    figures/

The file names are spelled here only; :class:`RunDir` gives their paths.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PROJECT_ROOT, Config

BEST_MODEL = "best_model.pt"
LAST_STATE = "last.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_RECORD = "run.json"
ONNX_MODEL = "model.onnx"
ENGINE = "model.engine"
EXPORT_REPORT = "export.json"


def rel(path: str | Path) -> str:
    """``path`` relative to the project root when inside it (stable text for notebooks)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class RunDir:
    """One run folder; each property is the path of one thing in it (it need not exist yet)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of(cls, profile_or_config: str | Config) -> "RunDir":
        """The run folder of a profile's default configuration, or of a configuration."""
        from .config import get_config

        cfg = get_config(profile_or_config) if isinstance(profile_or_config, str) else profile_or_config
        return cls(cfg.out_dir)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    best_model = property(lambda self: self.path / BEST_MODEL)
    last_state = property(lambda self: self.path / LAST_STATE)
    metrics = property(lambda self: self.path / METRICS)
    summary = property(lambda self: self.path / SUMMARY)
    run_record = property(lambda self: self.path / RUN_RECORD)
    onnx = property(lambda self: self.path / ONNX_MODEL)
    engine = property(lambda self: self.path / ENGINE)
    export_report = property(lambda self: self.path / EXPORT_REPORT)
    predictions = property(lambda self: self.path / "predictions")
    eval = property(lambda self: self.path / "eval")
    bench = property(lambda self: self.path / "bench")
    figures = property(lambda self: self.path / "figures")

    def read(self, name: str) -> Any:
        """The JSON record ``name`` (a path inside the run), or None when missing or unreadable."""
        from .provenance import read_json

        return read_json(self.path / name)

    @property
    def finished(self) -> bool:
        """Whether training wrote its last records (summary, run record and best model)."""
        return all(p.exists() for p in (self.summary, self.run_record, self.best_model))

    @property
    def interrupted(self) -> bool:
        """Whether a training state is here without a summary: a run that can be resumed."""
        return self.last_state.exists() and not self.summary.exists()


# ---------------------------------------------------------------------------------------------
# a profile's data, and training it once


def prepare_dataset(cfg: Config, progress: bool = False) -> str:
    """Make sure ``cfg``'s dataset is on disk; returns what was done, in one sentence.

    The quick profile's synthetic set is (re)generated when it is missing or was written by
    another version of the generator (deterministic: the same files on every machine); the full
    profile downloads MSD Task09 (1.5 GB, verified) when it is not there yet.
    """
    marker = cfg.dataset_dir / "dataset.json"
    if cfg.dataset.startswith("Synthetic"):
        from .synthetic import write_profile_dataset

        before = marker.read_text() if marker.exists() else None
        t0 = time.perf_counter()
        write_profile_dataset(cfg, progress=progress)
        if before is not None and marker.read_text() == before:
            return f"found {cfg.dataset} in {rel(cfg.data_root)}"
        return f"generated {cfg.dataset} in {rel(cfg.data_root)} ({time.perf_counter() - t0:.0f} s)"
    if marker.exists():
        return f"found {cfg.dataset} in {rel(cfg.data_root)}"
    from .data import download_msd

    download_msd(cfg.data_root, progress=progress)
    return f"downloaded and verified {cfg.dataset} into {rel(cfg.data_root)}"



def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration without the fields that only say where files are."""
    c = json.loads(json.dumps(config, default=str))
    for k in ("data_root", "out_dir"):
        c.pop(k, None)
    return c


def same_run(cfg: Config, run: RunDir) -> tuple[bool, str]:
    """Whether ``run``'s record is exactly ``cfg`` trained on exactly ``cfg``'s files, and why not."""
    from .data import dataset_checksums
    from .data import datalists

    record = run.read(RUN_RECORD)
    if not isinstance(record, dict):
        return False, f"the run records in {rel(run.path)} are missing or unreadable"
    if _comparable(record.get("config", {})) != _comparable(cfg.to_dict()):
        return False, f"the run in {rel(run.path)} used another configuration"
    train_items, val_items = datalists(cfg)  # the dataset's cases and the shipped real scans it names
    if record.get("data_md5") != dataset_checksums(train_items + val_items):
        return False, f"the run in {rel(run.path)} was trained on other data"
    return True, "same configuration and data"


def finished_run(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """The summary of a finished run of exactly ``cfg`` on the same data in ``cfg.out_dir``, and why not."""
    run = RunDir(cfg.out_dir)
    if not run.finished:
        return None, f"no finished run in {rel(run.path)}"
    same, why = same_run(cfg, run)
    if not same:
        return None, why
    summary = run.read(SUMMARY)
    if not isinstance(summary, dict) or summary.get("epochs") != cfg.epochs:
        return None, f"the run in {rel(run.path)} stopped before epoch {cfg.epochs}"
    return summary, why


def train_or_reuse(cfg: Config, retrain: bool = False, progress: bool = True) -> tuple[dict[str, Any], str]:
    """Train ``cfg``, or reuse a finished run of the same configuration and data.

    - a finished run of exactly this configuration on exactly these files (MD5 of every case)
      is reused, unless ``retrain``;
    - an interrupted run of this configuration on these files is resumed from its ``last.pt``;
    - any other run in the folder is moved aside to ``<out_dir>.previous-<time>`` (never
      deleted), then training starts afresh.

    Returns the run's summary and one sentence saying which of these happened.
    """
    from .train import train

    run = RunDir(cfg.out_dir)
    out = run.path
    summary, why = finished_run(cfg)
    if summary is not None and not retrain:
        return summary, f"reused the finished run in {rel(out)} ({why})"
    resume = False
    if out.exists() and any(out.iterdir()):
        interrupted = run.interrupted
        same, why_not = same_run(cfg, run) if interrupted and not retrain else (False, why)
        if same:
            resume, why = True, "an interrupted run of the same configuration and data"
        else:
            aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out, aside)
            why = f"{why_not if interrupted else why}; the previous run was moved to {aside.name}"
    t0 = time.perf_counter()
    summary = train(cfg, resume=resume, progress=progress)
    verb = "resumed and finished" if resume else "trained"
    n = summary["epochs"]
    return summary, f"{verb} {cfg.profile} for {n} epoch{'s' if n != 1 else ''} in {time.perf_counter() - t0:.0f} s ({why})"
