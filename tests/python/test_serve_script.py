"""scripts/serve's first and second run, with a stand-in swav binary that records what it is asked to do
(the real commands' flags are checked against the real binary in test_cli_usage.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from repo_tools import REPO

STUB = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$*" >>"$STUB_LOG"
case "$1" in
    dataset)
        out=${@: -1}
        mkdir -p "$out/Bag"
        printf 'png' >"$out/Bag/00003.png"
        for ((i = 10000; i < 10000 + ${STUB_MORE_IMAGES:-0}; i++)); do : >"$out/Bag/$i.png"; done ;;
    index) out=${@: -1}; mkdir -p "$out" ;;
    serve) echo "listening on 127.0.0.1:8080" ;;
esac
"""


@pytest.fixture
def sandbox(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx")
    manifest = {"schema_version": 1, "model_sha256": hashlib.sha256(b"onnx").hexdigest()}
    (model / "manifest.json").write_text(json.dumps(manifest))
    stub = tmp_path / "swav"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = dict(os.environ, SWAV_BIN=str(stub), SWAV_MODEL=str(model), SWAV_INDEX=str(tmp_path / "var" / "index"),
               SWAV_DEMO_IMAGES=str(tmp_path / "images"), SWAV_LISTEN="0.0.0.0:9123",
               SWAV_API_KEY="secret", STUB_LOG=str(tmp_path / "calls.log"),
               STUB_MORE_IMAGES="3000")  # enough file names to fill a pipe  # fmt: skip
    return tmp_path, env


def run_serve(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "serve"), "--workers", "2"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_first_run_exports_indexes_then_serves(sandbox):
    tmp_path, env = sandbox
    result = run_serve(env)
    assert result.returncode == 0, result.stderr
    model, index, images = env["SWAV_MODEL"], env["SWAV_INDEX"], env["SWAV_DEMO_IMAGES"]
    assert calls(tmp_path) == [
        f"dataset fashion-mnist --split test --out {images}",
        f"index build --model {model} --input {images} --out {index}",
        f"serve --model {model} --index {index} --listen 0.0.0.0:9123 --workers 2",
    ]
    assert "listening on" in result.stdout
    assert result.stdout.splitlines()[0].endswith(": http://127.0.0.1:9123/"), "the web page's URL comes first"
    png = f"{images}/Bag/00003.png"
    # Examples name a real file, reach the server on loopback, and read the key from the environment.
    assert f"--data-binary @{png}" in result.stdout
    assert "http://127.0.0.1:9123/v1/embed" in result.stdout
    assert "'http://127.0.0.1:9123/v1/search?k=5'" in result.stdout
    assert '"Authorization: Bearer $SWAV_API_KEY"' in result.stdout and "secret" not in result.stdout


def test_second_run_only_serves(sandbox):
    tmp_path, env = sandbox
    assert run_serve(env).returncode == 0
    (tmp_path / "calls.log").unlink()
    result = run_serve(env)
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls(tmp_path)] == ["serve"]


def test_a_new_model_moves_the_old_index_aside(sandbox):
    tmp_path, env = sandbox
    assert run_serve(env).returncode == 0
    (Path(env["SWAV_INDEX"]) / "items.log").write_text("added by a user")
    model = Path(env["SWAV_MODEL"])
    (model / "model.onnx").write_bytes(b"onnx v2")
    (model / "manifest.json").write_text(json.dumps({"model_sha256": hashlib.sha256(b"onnx v2").hexdigest()}))
    result = run_serve(env)
    assert result.returncode == 0, result.stderr
    kept = list((tmp_path / "var").glob("index.old-*"))
    assert len(kept) == 1 and (kept[0] / "items.log").read_text() == "added by a user"
    assert "the model changed" in result.stderr
    assert [c.split()[:2] for c in calls(tmp_path)][-2:] == [["index", "build"], ["serve", "--model"]]


def test_an_interrupted_export_is_finished_by_the_next_run(sandbox):
    tmp_path, env = sandbox
    images = Path(env["SWAV_DEMO_IMAGES"])
    (images / "Bag").mkdir(parents=True)
    (images / "Bag" / "00001.png").write_text("written by the interrupted run")
    assert run_serve(env).returncode == 0
    # The export resumes (it keeps what is there) and only then is the folder marked complete.
    assert (images / "Bag" / "00001.png").read_text() == "written by the interrupted run"
    assert calls(tmp_path)[0].startswith("dataset fashion-mnist")
    assert Path(f"{images}.complete").exists()


def test_missing_model_is_a_clear_error(sandbox):
    tmp_path, env = sandbox
    env["SWAV_MODEL"] = str(tmp_path / "nowhere")
    result = run_serve(env)
    assert result.returncode != 0
    assert f"{tmp_path}/nowhere/manifest.json not found" in result.stderr
    assert calls(tmp_path) == []


def test_deleted_outputs_are_made_again(sandbox):
    tmp_path, env = sandbox
    assert run_serve(env).returncode == 0
    (tmp_path / "calls.log").unlink()
    for folder in (env["SWAV_INDEX"], env["SWAV_DEMO_IMAGES"]):
        subprocess.run(["rm", "-rf", folder], check=True)
    assert run_serve(env).returncode == 0
    assert [c.split()[0] for c in calls(tmp_path)] == ["dataset", "index", "serve"]
