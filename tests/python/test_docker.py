"""What can be checked of the Docker files without building them: hadolint, the paths they copy, the
runtime user, the health check, the compose file and the Prometheus configuration it mounts, and the
swav flags and variables they rely on. test_docker_run.py builds the images and runs them."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from repo_tools import REPO, swav_bin, venv_tool  # noqa: F401 (swav_bin is a fixture)
from dockerfile import copy_parts, global_args, instructions, stages

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cuda"]
PROMETHEUS_DOCKERFILE = "docker/Dockerfile.prometheus"
COMPOSE = REPO / "docker" / "compose.yaml"
# Made by scripts/docker-local, not committed: the binary of the "prebuilt" stage.
STAGED = ".docker-local/"


@pytest.mark.parametrize("name", DOCKERFILES + [PROMETHEUS_DOCKERFILE])
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
        for ins in stage.all("COPY") + stage.all("ADD") + stage.all("RUN"):
            if ins.keyword == "RUN":
                # Bind mounts of the build context (the ort stage's scripts) need the same paths.
                mounts = re.findall(r"--mount=type=bind,(\S+)", ins.args)
                sources = [dict(kv.split("=", 1) for kv in m.split(","))["source"] for m in mounts]
            else:
                options, sources, _ = copy_parts(ins)
                if "from" in options:
                    continue
            for source in sources:
                if source == ".":
                    continue
                pattern = ignored_by(source, patterns)
                if source.startswith(STAGED):
                    assert source in (REPO / "scripts" / "docker-local").read_text(), f"{name}:{ins.line}: {source}"
                    assert pattern is None, f"{name}:{ins.line}: {source} is excluded by .dockerignore ({pattern})"
                    continue
                assert (REPO / source).exists(), f"{name}:{ins.line}: {source} does not exist in the repository"
                assert pattern is None, f"{name}:{ins.line}: {source} is excluded by .dockerignore ({pattern})"
                checked += 1
    assert checked >= 4, f"{name}: expected the ort scripts and the model among its sources"


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


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_binary_stage_is_chosen_by_an_argument_naming_a_stage(name):
    """FROM ${SWAV_BINARY}: "compile" (Docker Hub's rust image) by default, "prebuilt" offline."""
    by_name = {s.name: s for s in stages(REPO / name)}
    assert by_name["binary"].raw_base == "${SWAV_BINARY}"
    assert global_args(REPO / name)["SWAV_BINARY"] == "compile"
    assert by_name["compile"].base.startswith("rust:") and by_name["compile"].raw_base == "${RUST_IMAGE}"
    options, sources, dest = copy_parts(by_name["prebuilt"].all("COPY")[0])
    assert sources == [STAGED + "swav"] and dest == "/usr/local/bin/swav"
    assert "prebuilt" in (REPO / "scripts" / "docker-local").read_text()


@pytest.mark.parametrize("name", DOCKERFILES + [PROMETHEUS_DOCKERFILE])
def test_runtime_base_is_debian_bookworm_by_default_and_replaceable(name):
    stage = stages(REPO / name)[-1]
    assert stage.raw_base == "${BASE_IMAGE}" and stage.base == "debian:bookworm-slim"
    assert not (REPO / name).read_text().startswith("# syntax="), "a syntax line pulls a frontend from Docker Hub"


def runtime(name: str):
    return stages(REPO / name)[-1]


@pytest.mark.parametrize("name", DOCKERFILES + [PROMETHEUS_DOCKERFILE])
def test_runtime_runs_as_a_non_root_user(name):
    users = runtime(name).all("USER")
    assert users, f"{name}: the runtime stage has no USER, so it would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{name}: runtime USER is {users[-1].args}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_asks_ready(name):
    checks = runtime(name).all("HEALTHCHECK")
    assert len(checks) == 1, f"{name}: expected one HEALTHCHECK in the runtime stage"
    # The port is SWAV_LISTEN's (8080 unless a host-network run moves it).
    assert re.search(r"http://127\.0\.0\.1:\$\{SWAV_LISTEN##\*:\}/ready\b", checks[0].args), checks[0].args


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


def test_cuda_image_runs_on_cuda_with_the_gpu_library_and_the_cuda_wheels():
    stage = runtime("docker/Dockerfile.cuda")
    assert "nvidia/cuda" not in (REPO / "docker/Dockerfile.cuda").read_text().replace("no nvidia/cuda image", "")
    assert stage.base == runtime("docker/Dockerfile").base
    env = stage.env()
    assert env["SWAV_DEVICE"] == "cuda"
    # cuDNN opens its parts by name: the loader must search the directory they were unpacked into.
    assert env["LD_LIBRARY_PATH"] == str(Path(env["SWAV_ORT_LIB"]).parent)
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    runs = " ".join(i.args for s in stages(REPO / "docker/Dockerfile.cuda") for i in s.all("RUN"))
    assert "install-ort --gpu --cuda-libs" in runs
    assert runtime("docker/Dockerfile").env()["SWAV_DEVICE"] == "cpu"


def test_cuda_wheels_are_what_onnxruntime_gpu_names_and_pinned_by_hash():
    text = (REPO / "scripts/ort/cuda-libs.txt").read_text()
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", text, flags=re.MULTILINE))
    # onnxruntime-gpu 1.31.1's METADATA, extras cuda and cudnn, and what those wheels depend on.
    assert set(pins) == {
        "nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-cufft", "nvidia-curand", "nvidia-cudnn-cu13",
        "nvidia-cublas", "nvidia-nvjitlink",
    }
    assert pins["nvidia-cuda-runtime"].startswith("13.0.") and pins["nvidia-cudnn-cu13"].startswith("9.")


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


MILVUS_PROFILE = {"milvus-etcd", "milvus-minio", "milvus", "swav-milvus-a", "swav-milvus-b"}


def test_compose_uses_the_host_network_and_listens_on_loopback_only():
    doc = yaml.safe_load(COMPOSE.read_text())
    default = {name: service for name, service in doc["services"].items() if "profiles" not in service}
    assert set(default) == {"swav", "prometheus"}, "what `compose up` starts without a profile"
    for name, service in default.items():
        assert service["network_mode"] == "host", f"{name}: a bridge network is not allowed"
        assert "ports" not in service, f"{name}: ports mean nothing on the host network"
        assert "networks" not in service, f"{name}: on the host network, no other"
        assert service["build"]["network"] == "host", f"{name}: builds must use the host network too"
    assert doc["services"]["swav"]["environment"]["SWAV_LISTEN"].startswith("127.0.0.1:${SWAV_PORT:-8080}")
    assert "--web.listen-address=127.0.0.1:" in " ".join(doc["services"]["prometheus"]["command"])


def test_compose_milvus_profile_keeps_milvus_off_the_hosts_network():
    """Milvus listens on every interface without authentication: its profile runs on a bridge network
    of its own, publishes nothing but the two swav replicas, and those on loopback only."""
    doc = yaml.safe_load(COMPOSE.read_text())
    profiled = {name: service for name, service in doc["services"].items() if "profiles" in service}
    assert set(profiled) == MILVUS_PROFILE
    assert set(doc["networks"]) == {"milvus"}
    for name, service in profiled.items():
        assert service["profiles"] == ["milvus"], name
        assert service["networks"] == ["milvus"] and "network_mode" not in service, name
        if name.startswith("swav-"):
            assert len(service["ports"]) == 1 and service["ports"][0].startswith("127.0.0.1:"), service["ports"]
            assert service["ports"][0].endswith(":8080"), "the image's port"
        else:
            assert "ports" not in service, f"{name} must not be published"
    assert doc["services"]["milvus"]["image"] == "milvusdb/milvus:v2.3.5", "the release the tests run"


def test_compose_prometheus_is_built_from_debian_on_the_same_base():
    doc = yaml.safe_load(COMPOSE.read_text())
    prometheus = doc["services"]["prometheus"]
    assert (COMPOSE.parent / prometheus["build"]["context"] / prometheus["build"]["dockerfile"]).resolve() == (
        REPO / PROMETHEUS_DOCKERFILE
    )
    assert prometheus["build"]["args"]["BASE_IMAGE"] == doc["services"]["swav"]["build"]["args"]["BASE_IMAGE"]
    runs = " ".join(i.args for i in runtime(PROMETHEUS_DOCKERFILE).all("RUN"))
    assert "apt-get install -y --no-install-recommends prometheus" in runs


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
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


def test_the_cli_knows_every_variable_the_images_and_compose_set(swav_bin):
    help_text = subprocess.run(
        [str(swav_bin), "serve", "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    used = set()
    for name in DOCKERFILES:
        used |= set(runtime(name).env())
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("swav", "swav-milvus-a", "swav-milvus-b"):
        used |= set(services[name]["environment"])
    assert {"SWAV_MODEL", "SWAV_INDEX", "SWAV_LISTEN", "SWAV_API_KEY", "SWAV_ORT_LIB", "SWAV_DEVICE"} <= used
    # The others (LD_LIBRARY_PATH, NVIDIA_*) are for the loader and the container runtime.
    missing = sorted(v for v in used if v.startswith("SWAV_") and v not in help_text)
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
