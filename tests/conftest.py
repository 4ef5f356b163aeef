"""Shared fixtures: tiny synthetic data, the real CT fixtures (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def real_data_dir() -> Path | None:
    env = os.environ.get("SPLEEN_REAL_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data" / "real")
    for c in candidates:
        if (c / "totalseg_ct_3mm.nii.gz").exists():
            return c
    return None


@pytest.fixture(scope="session")
def real_dir() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("real CT fixtures not found (set SPLEEN_REAL_DATA or place them in ../shared/data/real)")
    return d
