"""scripts/test's own logic: both suites always run, the exit status and the closing line follow them.
cargo and the environment's python are stand-ins here (the real ones run when scripts/test runs)."""

from __future__ import annotations

import os
import subprocess

import pytest

from repo_tools import REPO

CARGO = r"""#!/usr/bin/env bash
printf 'cargo %s\n' "$*" >>"$STUB_LOG"
case "$*" in
    --version) echo "cargo 1.95.0 (stand-in)" ;;
    "test --locked --all-targets")
        echo "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
        if [[ -n ${CARGO_FAILS:-} ]]; then
            echo "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            exit 101
        fi ;;
    "test --locked --doc") echo "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s" ;;
esac
"""

PYTHON = r"""#!/usr/bin/env bash
printf 'python %s\n' "$*" >>"$STUB_LOG"
case "$*" in
    "-m pip install"*) exit 0 ;;
    "-m pytest"*) printf '%s\n' "$PYTEST_SAYS"; exit "$PYTEST_EXIT" ;;
    "-m ruff check training") exit "${RUFF_EXIT:-0}" ;;
    "-m mypy") exit "${MYPY_EXIT:-0}" ;;
esac
exit 3
"""


@pytest.fixture
def env(tmp_path):
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    for folder, name, text in [(bin_dir, "cargo", CARGO), (venv_bin, "python", PYTHON)]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    # The Milvus test environment's set-up runs the same stand-in python.
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SWAV_VENV=str(tmp_path / "venv"),
                SWAV_MILVUS_VENV=str(tmp_path / "venv"),
                STUB_LOG=str(tmp_path / "calls.log"), PYTEST_SAYS="5 passed, 1 skipped in 0.20s",
                PYTEST_EXIT="0")  # fmt: skip


def run_test_script(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "test")], env=env, capture_output=True, text=True, timeout=120)


def test_both_suites_pass(env, tmp_path):
    result = run_test_script(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "total: 15 passed, 0 failed, 2 skipped"
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "cargo build --locked --bin swav" in calls
    assert any(c.startswith("python -m pytest") and "training/tests tests/python" in c for c in calls)
    assert "python -m ruff check training" in calls and "python -m mypy" in calls


@pytest.mark.parametrize("tool", ["RUFF", "MYPY"])
def test_lint_or_type_errors_in_the_trainer_fail_the_run_and_pytest_still_runs(env, tmp_path, tool):
    env[f"{tool}_EXIT"] = "1"
    result = run_test_script(env)
    assert result.returncode != 0
    assert "ruff or mypy found problems in training/" in result.stdout
    assert "python -m pytest" in (tmp_path / "calls.log").read_text()
    assert result.stdout.splitlines()[-1] == "total: 15 passed, 1 failed, 2 skipped"


def test_failing_rust_tests_fail_the_run_and_python_still_runs(env, tmp_path):
    env["CARGO_FAILS"] = "1"
    result = run_test_script(env)
    assert result.returncode != 0
    assert result.stdout.splitlines()[-1] == "total: 16 passed, 2 failed, 2 skipped"
    assert "python -m pytest" in (tmp_path / "calls.log").read_text()


def test_failing_python_tests_fail_the_run(env):
    env.update(PYTEST_SAYS="1 failed, 4 passed in 0.30s", PYTEST_EXIT="1")
    result = run_test_script(env)
    assert result.returncode != 0
    assert result.stdout.splitlines()[-1] == "total: 14 passed, 1 failed, 1 skipped"


def test_pytest_collecting_nothing_is_a_failure(env):
    env.update(PYTEST_SAYS="no tests ran in 0.01s", PYTEST_EXIT="5")
    result = run_test_script(env)
    assert result.returncode != 0
    assert "pytest collected no tests" in result.stdout
    assert result.stdout.splitlines()[-1] == "total: 10 passed, 1 failed, 1 skipped"
