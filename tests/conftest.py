"""Shared fixtures: the real CT fixtures' folder (tests that need it skip with a reason when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real CT fixtures' folder, found by the library's one rule (``spleen_utils.samples.real_data_dir``)."""
    from spleen_utils.samples import real_data_dir

    d = real_data_dir("totalseg_ct_3mm.nii.gz")
    if d is None:
        pytest.skip("real CT fixtures not found (set SPLEEN_REAL_DATA or place them in ../shared/data/real)")
    return d
