"""The Docker files cannot be built here (no Docker engine), so these tests hold them to what can be
checked without one: hadolint, the paths they copy, the runtime user, the health check, the compose
file and the Prometheus configuration it mounts, and the swav flags and variables they rely on."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from repo_tools import REPO, swav_bin, venv_tool  # noqa: F401 (swav_bin is a fixture)
from dockerfile import copy_parts, instructions, stages

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cuda"]
COMPOSE = REPO / "docker" / "compose.yaml"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", str(REPO / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint {name}:\n{result.stdout}{result.stderr}"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored_by(path: str, patterns: list[str]) -> str | None:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_path_exists_and_reaches_the_build_context(name):
    patterns = dockerignore_patterns()
    checked = 0
    for stage in stages(REPO / name):
        for ins in stage.all("COPY") + stage.all("ADD"):
            options, sources, _ = copy_parts(ins)
            if "from" in options:
                continue
            for source in sources:
                if source == ".":
                    continue
                assert (REPO / source).exists(), f"{name}:{ins.line}: {source} does not exist in the repository"
                pattern = ignored_by(source, patterns)
                assert pattern is None, f"{name}:{ins.line}: {source} is excluded by .dockerignore ({pattern})"
                checked += 1
    assert checked >= 4, f"{name}: expected the ort scripts and the model among its COPY sources"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_from_names_an_earlier_stage(name):
    seen: set[str] = set()
    for stage in stages(REPO / name):
        for ins in stage.all("COPY"):
            options, _, _ = copy_parts(ins)
            if "from" in options:
                assert options["from"] in seen, f"{name}:{ins.line}: no earlier stage named {options['from']}"
        if stage.name:
            seen.add(stage.name)


def runtime(name: str):
    return stages(REPO / name)[-1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_runs_as_a_non_root_user(name):
    users = runtime(name).all("USER")
    assert users, f"{name}: the runtime stage has no USER, so it would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{name}: runtime USER is {users[-1].args}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_asks_ready(name):
    checks = runtime(name).all("HEALTHCHECK")
    assert len(checks) == 1, f"{name}: expected one HEALTHCHECK in the runtime stage"
    assert re.search(r"http://127\.0\.0\.1:8080/ready\b", checks[0].args), checks[0].args


@pytest.mark.parametrize("name", DOCKERFILES)
def test_server_listens_on_the_exposed_port_with_the_copied_model_and_library(name):
    stage = runtime(name)
    env = stage.env()
    assert env.get("SWAV_LISTEN") == "0.0.0.0:8080", env
    assert [i.args for i in stage.all("EXPOSE")] == ["8080"]
    destinations = [copy_parts(i)[2].rstrip("/") for i in stage.all("COPY")]
    assert env["SWAV_MODEL"] in destinations, f"{name}: SWAV_MODEL {env['SWAV_MODEL']} is not a COPY destination"
    lib_dir = str(Path(env["SWAV_ORT_LIB"]).parent)
    assert lib_dir in destinations, f"{name}: SWAV_ORT_LIB {env['SWAV_ORT_LIB']} is not under a COPY destination"
    volumes = [v for i in stage.all("VOLUME") for v in i.words()]
    assert any(env["SWAV_INDEX"].startswith(v + "/") for v in volumes), f"{name}: the index is not on a volume"
    assert stage.all("ENTRYPOINT")[-1].words() == ["swav"]


def test_cuda_image_runs_on_cuda_with_the_gpu_library():
    stage = runtime("docker/Dockerfile.cuda")
    assert stage.base.startswith("nvidia/cuda:13.") and "cudnn-runtime" in stage.base
    assert stage.env()["SWAV_DEVICE"] == "cuda"
    runs = " ".join(i.args for s in stages(REPO / "docker/Dockerfile.cuda") for i in s.all("RUN"))
    assert "install-ort --gpu" in runs
    assert runtime("docker/Dockerfile").env()["SWAV_DEVICE"] == "cpu"


def test_compose_builds_the_cpu_image_and_keeps_data_on_a_named_volume():
    doc = yaml.safe_load(COMPOSE.read_text())
    swav = doc["services"]["swav"]
    context = (COMPOSE.parent / swav["build"]["context"]).resolve()
    assert context == REPO
    assert (context / swav["build"]["dockerfile"]).is_file()
    volume, _, mount = swav["volumes"][0].partition(":")
    assert volume in doc["volumes"], f"{volume} is not a declared named volume"
    assert runtime(swav["build"]["dockerfile"]).env()["SWAV_INDEX"].startswith(mount + "/")
    assert "${SWAV_API_KEY:?" in COMPOSE.read_text(), "compose must refuse to start without an API key"
    assert all(port.startswith("127.0.0.1:") for s in doc["services"].values() for port in s.get("ports", []))


def test_prometheus_scrapes_the_swav_service_metrics():
    doc = yaml.safe_load(COMPOSE.read_text())
    prometheus = doc["services"]["prometheus"]
    assert prometheus["depends_on"]["swav"]["condition"] == "service_healthy"
    binds = [v.split(":") for v in prometheus["volumes"] if v.startswith(".")]
    assert binds, "prometheus mounts no configuration file"
    for host, container, *_ in binds:
        assert (COMPOSE.parent / host).is_file(), f"{host} does not exist beside compose.yaml"
    config_host = next(host for host, container, *_ in binds if container == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((COMPOSE.parent / config_host).read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["swav:8080"]


def swav_variables(text: str) -> set[str]:
    return set(re.findall(r"\bSWAV_[A-Z_]+\b", text))


def test_the_cli_knows_every_variable_the_images_and_compose_set(swav_bin):
    help_text = subprocess.run(
        [str(swav_bin), "serve", "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    used = set()
    for name in DOCKERFILES:
        used |= set(runtime(name).env())
    used |= swav_variables(COMPOSE.read_text())
    assert {"SWAV_MODEL", "SWAV_INDEX", "SWAV_LISTEN", "SWAV_API_KEY", "SWAV_ORT_LIB", "SWAV_DEVICE"} <= used
    missing = sorted(v for v in used if v not in help_text)
    assert not missing, f"`swav serve --help` does not mention {missing}"


def test_dockerfile_reader_joins_continuations(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# c\nFROM a AS b\nRUN one \\\n    # inner comment\n    two\nENV A=1 \\\n    B=2\n")
    parsed = instructions(path)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "a AS b", 2),
        ("RUN", "one two", 3),
        ("ENV", "A=1 B=2", 6),
    ]
    assert stages(path)[0].env() == {"A": "1", "B": "2"}
