"""The service's settings: defaults, then ``SPLEEN_*`` environment variables, then command-line options;
each refused value is one sentence naming the setting."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpleenError

ENV_PREFIX = "SPLEEN_"




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
    lcc: bool = True  # keep one connected component (postprocess.keep_one_component)
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

