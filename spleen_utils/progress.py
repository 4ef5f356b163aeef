"""Progress of long steps, visible outside the process that does them.

``spleen-seg reproduce`` runs the notebooks in Jupyter kernels (papermill) and sees none of their
output until a notebook ends: training alone is ten silent minutes. So the long steps (generating
data, training, benchmarking) also report here. When the environment variable
:data:`ENV` names a file, :func:`report` appends one JSON line to it; a :class:`Watcher` in the
reproduce process reads the lines as they arrive and prints a short status line now and then:

    training: epoch 12/50 · val Dice 0.713 · 2:10 elapsed, about 7:05 left

Without the variable :func:`report` does nothing (the notebooks and the CLI have their own bars).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

#: the environment variable naming the progress file (inherited by papermill's kernels)
ENV = "SPLEEN_PROGRESS"


def report(step: str, done: int, total: int, unit: str = "", **info: Any) -> None:
    """Record that ``done`` of ``total`` units of ``step`` are finished (a no-op unless :data:`ENV` is set).

    Report ``done=0`` when the step starts, so its clock starts there.

    ``info`` adds short facts to the printed line (for example ``val_dice=0.71``). Never raises:
    progress must not break the work it describes.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    row = {"t": time.time(), "step": step, "done": int(done), "total": int(total), "unit": unit}
    row.update({k: v for k, v in info.items() if v is not None})
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
    except OSError:
        pass


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(row: dict[str, Any], started: float) -> str:
    """One status line for a progress ``row`` of a step that started at ``started`` (epoch seconds)."""
    done, total = row["done"], row["total"]
    unit = f"{row['unit']} " if row.get("unit") else ""
    parts = [f"{row['step']}: {unit}{done}/{total}"]
    for k, v in row.items():
        if k in ("t", "step", "done", "total", "unit"):
            continue
        label = k.replace("_", " ").replace("dice", "Dice")
        parts.append(f"{label} {v:.3f}" if isinstance(v, float) else f"{label} {v}")
    elapsed = row["t"] - started
    timing = f"{_clock(elapsed)} elapsed"
    if 0 < done < total:
        timing += f", about {_clock(elapsed / done * (total - done))} left"
    parts.append(timing)
    return " · ".join(parts)


class Watcher:
    """Print the progress lines another process appends to ``path``, at most one per ``every`` s.

    The first and the last report of each step are always printed. Use as a context manager
    around the work; it sets :data:`ENV` for child processes while it runs.
    """

    def __init__(self, path: str | Path, log: Callable[[str], Any] = print, every: float = 30.0, poll: float = 1.0):
        self.path = Path(path)
        self.log, self.every, self.poll = log, every, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spleen-progress", daemon=True)
        self._offset = 0
        self._started: dict[str, float] = {}
        self._printed: dict[str, float] = {}
        self._previous_env: str | None = None

    def __enter__(self) -> "Watcher":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._previous_env = os.environ.get(ENV)
        os.environ[ENV] = str(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll_once()  # whatever arrived after the last poll
        if self._previous_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._previous_env

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.poll_once()

    def poll_once(self) -> None:
        """Read the new lines and print what is due."""
        try:
            with self.path.open("r", encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                row = json.loads(line)
                step, done, total = row["step"], row["done"], row["total"]
            except (ValueError, KeyError, TypeError):
                continue
            if done == 0 or step not in self._started:
                # a step that starts (again: a second training run) starts its clock; a resumed
                # run says how long it had already been running
                self._started[step] = row["t"] - float(row.get("elapsed_s", 0.0))
                self._printed.pop(step, None)
                if done == 0:
                    continue
            due = step not in self._printed or done >= total or row["t"] - self._printed[step] >= self.every
            if due:
                shown = {k: v for k, v in row.items() if k != "elapsed_s"}
                self.log("           " + describe(shown, self._started[step]))
                self._printed[step] = row["t"]
