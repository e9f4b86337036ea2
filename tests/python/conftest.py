"""Shared fixtures for the repository-level Python tests (scripts, Docker files, figures)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def venv_tool(name: str) -> str:
    """A command-line tool installed by tests/python/requirements.txt, beside this interpreter or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install tests/python/requirements.txt (scripts/setup-train does)")
    return found


@pytest.fixture(scope="session")
def swav_bin() -> Path:
    """The swav binary that scripts/test builds before running pytest (override with SWAV_BIN)."""
    path = Path(os.environ.get("SWAV_BIN", REPO / "target" / "debug" / "swav"))
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build --bin swav` first, or set SWAV_BIN (scripts/test does both)")
    return path
