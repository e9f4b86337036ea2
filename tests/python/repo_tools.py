"""Where the repository is, how the tests find the tools that tests/python/requirements.txt installs,
and the swav binary fixture.

There is deliberately no conftest.py in tests/python: pytest runs these tests together with
training/tests, whose modules `import conftest`, and two conftest.py files would shadow each other.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def venv_tool(name: str) -> str:
    """A command-line tool installed beside this interpreter (or on PATH); fails the test if absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install tests/python/requirements.txt (scripts/setup-train does)")
    return found


def fixture_bundle(name: str) -> Path:
    """A committed test bundle under tests/fixtures/bundles (SWAV_FIXTURE_BUNDLES points elsewhere)."""
    root = Path(os.environ.get("SWAV_FIXTURE_BUNDLES", REPO / "tests" / "fixtures" / "bundles"))
    bundle = root / name
    if not (bundle / "manifest.json").is_file():
        pytest.fail(f"{bundle}/manifest.json not found: the trainer's fixture bundles must be committed")
    return bundle


@pytest.fixture(scope="session")
def swav_bin() -> Path:
    """The swav binary that scripts/test builds before running pytest (override with SWAV_BIN)."""
    path = Path(os.environ.get("SWAV_BIN", REPO / "target" / "debug" / "swav"))
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build --bin swav` first, or set SWAV_BIN (scripts/test does both)")
    return path
