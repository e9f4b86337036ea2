"""Where the repository is, and how the tests find the tools that tests/python/requirements.txt installs.

(Not in conftest.py: training/tests has a conftest.py too, and a plain `import conftest` may get either.)
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
