"""The README's commands and their helpers: shell hygiene, ONNX Runtime install, the test summary."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repo_tools import REPO, venv_tool


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ortlib = load("ortlib", REPO / "scripts" / "ort" / "ortlib.py")
test_summary = load("test_summary", REPO / "scripts" / "lib" / "test_summary.py")

ENTRY_POINTS = ["scripts/setup", "scripts/setup-train", "scripts/setup-milvus", "scripts/install-ort",
                "scripts/serve", "scripts/test", "scripts/gpu_check.sh", "scripts/gpu_pack.sh", "scripts/docker-local", ".ci/run"]  # fmt: skip
SHELL_FILES = ENTRY_POINTS + ["scripts/lib/log.sh", "scripts/lib/apt.sh", "benchmarks/quick_serve.sh",
                              "benchmarks/ab_serve.sh"]  # fmt: skip


def test_shell_scripts_pass_shellcheck():
    result = subprocess.run([venv_tool("shellcheck"), *SHELL_FILES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_are_executable_and_strict(name):
    path = REPO / name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), f"{name}: expected a bash shebang"
    assert "\nset -euo pipefail\n" in text, f"{name}: expected set -euo pipefail"


def test_ci_runs_exactly_the_test_command():
    lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == "exec scripts/test"


# --- ONNX Runtime -----------------------------------------------------------------------------------


def test_installed_library_reports_the_pinned_version():
    lib = REPO / ".ort" / "libonnxruntime.so"
    if not lib.exists():
        pytest.fail(f"{lib} missing: scripts/setup installs it")
    assert ortlib.check(lib, "1.31.1") == "1.31.1"
    with pytest.raises(SystemExit, match="expected 9.9.9"):
        ortlib.check(lib, "9.9.9")


def fake_wheel(path: Path, members: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for member in members:
            zf.writestr(member, b"\x7fELF" + member.encode())
    return path


def test_extract_takes_the_native_libraries_and_links_the_main_one(tmp_path):
    wheel = fake_wheel(tmp_path / "ort.whl", [
        "onnxruntime/capi/libonnxruntime.so.1.31.1",
        "onnxruntime/capi/libonnxruntime_providers_shared.so",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so",
        "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
        "onnxruntime/capi/onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so",
        "onnxruntime/__init__.py",
    ])  # fmt: skip
    written = ortlib.extract(wheel, tmp_path / "out")
    assert sorted(p.name for p in written) == [
        "libonnxruntime.so.1.31.1",
        "libonnxruntime_providers_cuda.so",
        "libonnxruntime_providers_shared.so",
    ]
    link = tmp_path / "out" / "libonnxruntime.so"
    assert link.is_symlink() and os.readlink(link) == "libonnxruntime.so.1.31.1"
    assert link.read_bytes() == b"\x7fELFonnxruntime/capi/libonnxruntime.so.1.31.1"


def test_extract_refuses_a_wheel_without_the_library(tmp_path):
    wheel = fake_wheel(tmp_path / "ort.whl", ["onnxruntime/__init__.py"])
    with pytest.raises(SystemExit, match="expected one"):
        ortlib.extract(wheel, tmp_path / "out")


def test_extract_nvidia_flattens_the_cuda_wheels_libraries(tmp_path):
    runtime = fake_wheel(tmp_path / "rt.whl", [
        "nvidia/cu13/lib/libcudart.so.13",
        "nvidia/cu13/include/cuda_runtime.h",
        "nvidia/__init__.py",
    ])  # fmt: skip
    cudnn = fake_wheel(tmp_path / "cudnn.whl", ["nvidia/cudnn/lib/libcudnn.so.9", "nvidia/cudnn/lib/libcudnn_ops.so.9"])
    written = ortlib.extract_nvidia([runtime, cudnn], tmp_path / "out")
    assert sorted(p.name for p in written) == ["libcudart.so.13", "libcudnn.so.9", "libcudnn_ops.so.9"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    empty = fake_wheel(tmp_path / "empty.whl", ["nvidia/__init__.py"])
    with pytest.raises(SystemExit, match="no nvidia"):
        ortlib.extract_nvidia([empty], tmp_path / "out2")


def test_install_ort_takes_cuda_libs_only_with_the_gpu_build(tmp_path):
    result = subprocess.run(
        [str(REPO / "scripts/install-ort"), "--cuda-libs", "--dest", str(tmp_path / "ort")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "--cuda-libs goes with --gpu" in result.stderr


def test_install_ort_refuses_a_wheel_that_is_not_pinned(tmp_path):
    wheel = fake_wheel(tmp_path / "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                       ["onnxruntime/capi/libonnxruntime.so.1.31.1"])  # fmt: skip
    result = subprocess.run(
        [str(REPO / "scripts/install-ort"), "--dest", str(tmp_path / "ort"), "--wheel", str(wheel)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "is not one pinned" in result.stderr
    assert not (tmp_path / "ort").exists()


# --- the closing line of scripts/test ---------------------------------------------------------------

CARGO_LOG = """
running 12 tests
test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.20s
running 3 tests
test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
"""
PYTEST_LOG = """
..F.s
FAILED tests/python/test_x.py::test_y - assert 1 == 2
1 failed, 40 passed, 2 skipped, 1 error in 3.21s
"""


def test_summary_adds_cargo_and_pytest_counts():
    total, notes = test_summary.summarize([("cargo", CARGO_LOG, 101), ("pytest", PYTEST_LOG, 1)])
    assert (total.passed, total.failed, total.skipped) == (54, 3, 3)
    assert notes == []


def test_a_phase_that_failed_without_failing_tests_counts_as_a_failure():
    build_error = "error[E0308]: mismatched types\nerror: could not compile `swav`\n"
    total, notes = test_summary.summarize([("cargo", build_error, 101), ("pytest", "no tests ran in 0.01s", 5)])
    assert (total.passed, total.failed) == (0, 2)
    assert len(notes) == 2 and "exited 5" in notes[1]


def test_summary_command_prints_the_closing_line(tmp_path):
    (tmp_path / "cargo.log").write_text(CARGO_LOG)
    (tmp_path / "pytest.log").write_text("3 passed in 0.5s\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/lib/test_summary.py"),
         "cargo", str(tmp_path / "cargo.log"), "1", "pytest", str(tmp_path / "pytest.log"), "0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.splitlines()[-1] == "total: 17 passed, 1 failed, 1 skipped"
