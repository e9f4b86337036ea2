"""Fixtures for the repository-level Python tests (scripts, Docker files, figures)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from repo_tools import REPO


@pytest.fixture(scope="session")
def swav_bin() -> Path:
    """The swav binary that scripts/test builds before running pytest (override with SWAV_BIN)."""
    path = Path(os.environ.get("SWAV_BIN", REPO / "target" / "debug" / "swav"))
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build --bin swav` first, or set SWAV_BIN (scripts/test does both)")
    return path
