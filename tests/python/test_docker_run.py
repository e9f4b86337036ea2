"""The images built and run. scripts/docker-local makes the base images here from Debian's packages (no
Docker Hub) and builds swav:cpu, swav:cuda and swav-prometheus:debian around the swav binary the
other tests use; the base, CPU and Prometheus images left by an earlier run are reused, the CUDA one
is removed at the end (5 GB). Containers use the host's network (never a bridge) on free loopback
ports. When no Docker engine answers, the tests start one (scripts/docker-local engine) and stop it
at the end."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from repo_tools import REPO, swav_bin  # noqa: F401 (swav_bin is a fixture)

DOCKER_LOCAL = str(REPO / "scripts" / "docker-local")
FASHION_MNIST = Path(os.environ.get("SWAV_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
KEY = "docker-test-key"
BUILD_TIMEOUT = 1500


def docker_local(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [DOCKER_LOCAL, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, f"scripts/docker-local {' '.join(args)}:\n{result.stdout}{result.stderr[-6000:]}"
    return result


def engine_answers() -> bool:
    for client in filter(None, [shutil.which("docker"), "/usr/bin/docker"]):
        if Path(client).exists():
            try:
                ok = subprocess.run([client, "info"], capture_output=True, timeout=30).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if ok:
                return True
    return False


@pytest.fixture(scope="session")
def docker() -> Iterator[str]:
    """The docker client; the engine is started (packages installed if missing) when none answers."""
    started = not engine_answers()
    docker_local("engine", timeout=900)
    client = docker_local("docker", timeout=60).stdout.strip()
    yield client
    if started:
        docker_local("stop", timeout=120)


def run_docker(docker: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([docker, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def build(swav_bin: Path, *images: str) -> None:
    docker_local("build", "--binary", str(swav_bin), *images, timeout=BUILD_TIMEOUT)


@pytest.fixture(scope="session")
def cpu_image(docker, swav_bin) -> str:
    build(swav_bin, "cpu")
    return "swav:cpu"


@pytest.fixture(scope="session")
def cuda_image(docker, swav_bin) -> Iterator[str]:
    build(swav_bin, "cuda")
    yield "swav:cuda"
    # 5 GB with its build cache (2.5 GB of CUDA libraries twice) on a disk others share; the next
    # run downloads the wheels again (about 2 minutes here).
    docker_local("clean", "cuda", timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def authed(content_type: str = "application/json") -> dict:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}


class Volume:
    def __init__(self, docker: str):
        self.docker = docker
        self.name = f"swav-test-{uuid.uuid4().hex[:10]}"
        run_docker(docker, "volume", "create", self.name)

    def remove(self) -> None:
        run_docker(self.docker, "volume", "rm", "-f", self.name, check=False)


@pytest.fixture
def volume(docker) -> Iterator[Volume]:
    vol = Volume(docker)
    yield vol
    vol.remove()


class Container:
    """A detached container on the host network, serving on a free loopback port."""

    def __init__(self, docker: str, image: str, volume: Volume | None, *, env: dict | None = None,
                 read_only: bool = False, args: tuple[str, ...] = ()):
        self.docker = docker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = ["--network", "host", "-e", f"SWAV_API_KEY={KEY}", "-e", f"SWAV_LISTEN=127.0.0.1:{self.port}",
                   # The image's own check, asked more often than its 10 s so the tests wait less.
                   "--health-interval", "1s"]
        for key, value in (env or {}).items():
            options += ["-e", f"{key}={value}"]
        if volume:
            options += ["-v", f"{volume.name}:/var/lib/swav"]
        if read_only:
            options.append("--read-only")
        self.id = run_docker(docker, "run", "-d", *options, image, *args).stdout.strip()

    def inspect(self, template: str) -> str:
        return run_docker(self.docker, "inspect", "-f", template, self.id).stdout.strip()

    def logs(self) -> str:
        result = run_docker(self.docker, "logs", self.id, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.inspect("{{.State.Status}} {{.State.Health.Status}}")
            if status == "running healthy":
                return
            assert not status.startswith("exited"), f"the container ended:\n{self.logs()}"
            time.sleep(0.5)
        pytest.fail(f"not healthy after {timeout} s ({status}):\n{self.logs()}")

    def remove(self) -> None:
        # -v: the image's VOLUME gives a container run without -v an anonymous volume.
        run_docker(self.docker, "rm", "-f", "-v", self.id, check=False)


@pytest.fixture
def containers(docker) -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def fashion_mnist_pngs(out: Path, count: int) -> list[Path]:
    """The first COUNT test images of Fashion-MNIST as PNG files (readable by the container's user)."""
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051 and n >= count, (magic, n)
        pixels = f.read(count * rows * cols)
    paths = []
    for i in range(count):
        path = out / f"{i:05d}.png"
        Image.frombytes("L", (cols, rows), pixels[i * rows * cols:(i + 1) * rows * cols]).save(path)
        path.chmod(0o644)
        paths.append(path)
    return paths


@pytest.fixture
def png_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are private to root, and the container runs as uid 10001.
    path = Path(tempfile.mkdtemp(prefix="swav-docker-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def host_embedding(swav_bin: Path, png: Path) -> list[float]:
    result = subprocess.run(
        [str(swav_bin), "embed", "--model", str(REPO / "models" / "fashion-mnist"), str(png)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "SWAV_ORT_LIB": os.environ.get("SWAV_ORT_LIB", str(REPO / ".ort" / "libonnxruntime.so"))},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["embeddings"][0]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def assert_embeds_like_the_host(container: Container, swav_bin: Path, png: Path) -> None:
    status, body = http("POST", f"{container.url}/v1/embed", png.read_bytes(), authed("image/png"))
    assert status == 200, body
    served = json.loads(body)["embeddings"][0]
    expected = host_embedding(swav_bin, png)
    assert len(served) == len(expected)
    assert cosine(served, expected) >= 0.9999


def test_cpu_image_serves_like_the_host_binary_as_non_root_on_a_read_only_root(
    docker, cpu_image, volume, containers, png_dir, swav_bin
):
    container = Container(docker, cpu_image, volume, read_only=True)
    containers.append(container)
    container.wait_healthy()
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    png = fashion_mnist_pngs(png_dir, 1)[0]
    assert_embeds_like_the_host(container, swav_bin, png)
    status, body = http("POST", f"{container.url}/v1/embed", png.read_bytes(), {"Content-Type": "image/png"})
    assert status == 401 and json.loads(body)["error"]["code"], body
    # The server process itself, seen from the host.
    pid = container.inspect("{{.State.Pid}}")
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == ["10001"] * 4, uids


def add_item(container: Container, item_id: str, png: Path) -> None:
    import base64

    body = json.dumps({"items": [{"id": item_id, "image": base64.b64encode(png.read_bytes()).decode()}]})
    status, answer = http("POST", f"{container.url}/v1/items", body.encode(), authed())
    assert status == 200 and json.loads(answer)["ids"] == [item_id], answer


def test_an_item_added_through_the_api_outlives_the_container(docker, cpu_image, volume, containers, png_dir):
    png = fashion_mnist_pngs(png_dir, 1)[0]
    first = Container(docker, cpu_image, volume, read_only=True)
    containers.append(first)
    first.wait_healthy()
    add_item(first, "kept-item", png)
    run_docker(docker, "stop", first.id, timeout=60)
    first.remove()
    second = Container(docker, cpu_image, volume, read_only=True)
    containers.append(second)
    second.wait_healthy()
    status, body = http("GET", f"{second.url}/v1/items/kept-item", headers=authed())
    assert status == 200, body
    status, body = http("GET", f"{second.url}/v1/items/never-added", headers=authed())
    assert status == 404, body


def test_index_build_in_the_container_then_served(docker, cpu_image, volume, containers, png_dir):
    pngs = fashion_mnist_pngs(png_dir, 200)
    built = run_docker(
        docker, "run", "--rm", "--network", "host", "--read-only", "-v", f"{volume.name}:/var/lib/swav",
        "-v", f"{png_dir}:/photos:ro", cpu_image,
        "index", "build", "--input", "/photos", "--out", "/var/lib/swav/index", "--no-progress",
        timeout=600,
    )
    assert "200" in built.stdout + built.stderr
    container = Container(docker, cpu_image, volume, read_only=True)
    containers.append(container)
    container.wait_healthy()
    status, body = http("GET", f"{container.url}/v1/index", headers=authed())
    assert status == 200 and json.loads(body)["items"] == 200, body
    status, body = http("POST", f"{container.url}/v1/search?k=1", pngs[7].read_bytes(), authed("image/png"))
    assert status == 200, body
    assert "00007.png" in json.dumps(json.loads(body)["results"][0][0]), body


def test_cuda_image_without_a_gpu_serves_on_the_cpu_with_device_auto(docker, cuda_image, containers, png_dir, swav_bin):
    container = Container(docker, cuda_image, None, env={"SWAV_DEVICE": "auto"})
    containers.append(container)
    container.wait_healthy(timeout=180)
    assert "CUDA unavailable, using CPU" in container.logs()
    status, body = http("GET", f"{container.url}/v1/model", headers=authed())
    assert status == 200 and json.loads(body)["execution_provider"] == "cpu", body
    assert_embeds_like_the_host(container, swav_bin, fashion_mnist_pngs(png_dir, 1)[0])


def test_cuda_image_with_device_cuda_and_no_gpu_fails_at_start_with_a_clear_message(docker, cuda_image):
    # The image's default device is cuda: without a GPU it must not fall back to the CPU silently.
    result = run_docker(
        docker, "run", "--rm", "--network", "host", "-e", f"SWAV_API_KEY={KEY}",
        "-e", f"SWAV_LISTEN=127.0.0.1:{free_port()}", cuda_image, timeout=180, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "execution provider cuda:0 is not available" in output and "listening" not in output, output


def compose_config(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`docker-compose config` of docker/compose.yaml, as scripts/docker-local runs compose."""
    return subprocess.run([DOCKER_LOCAL, "compose", *args, "config"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})


def test_compose_milvus_profile_is_valid_and_wires_two_replicas_to_one_collection(docker):
    """The profile's images come from Docker Hub and quay.io, which this machine cannot reach: what
    can be checked here is what Compose makes of the file."""
    env = {"SWAV_API_KEY": KEY, "SWAV_REPLICA_B_PORT": "18082", "SWAV_MILVUS_COLLECTION": "shared"}
    result = compose_config("--profile", "milvus", env=env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"swav", "prometheus", "milvus-etcd", "milvus-minio", "milvus", "swav-milvus-a", "swav-milvus-b"}
    milvus = services["milvus"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "milvus-etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "milvus-minio:9000"
    assert {name: dep["condition"] for name, dep in milvus["depends_on"].items()} == {
        "milvus-etcd": "service_healthy", "milvus-minio": "service_healthy"}
    for name, port in (("swav-milvus-a", "8081"), ("swav-milvus-b", "18082")):
        replica = services[name]
        assert replica["image"] == "swav:cpu" and replica["environment"]["SWAV_API_KEY"] == KEY
        assert replica["environment"]["SWAV_INDEX"] == "milvus://milvus:19530/shared", replica["environment"]
        assert replica["environment"]["SWAV_LISTEN"] == "0.0.0.0:8080"
        assert replica["ports"] == [f"127.0.0.1:{port}:8080/tcp"], replica["ports"]
        assert "volumes" not in replica, "a replica keeps no state of its own"
    assert services["swav-milvus-a"]["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert services["swav-milvus-b"]["depends_on"]["swav-milvus-a"]["condition"] == "service_healthy"

    # Without the profile the default services are what they were: swav and Prometheus on the host's
    # network; and neither way starts without an API key.
    default = yaml.safe_load(compose_config(env=env).stdout)["services"]
    assert default["swav"] == services["swav"] and default["prometheus"] == services["prometheus"]
    assert default["swav"]["network_mode"] == "host" and "profiles" not in default["swav"]
    assert default["swav"]["environment"]["SWAV_LISTEN"] == "127.0.0.1:8080"
    refused = compose_config("--profile", "milvus", env={**env, "SWAV_API_KEY": None})
    assert refused.returncode != 0 and "SWAV_API_KEY" in refused.stderr, refused.stderr


def prometheus_query(port: int, query: str) -> list | None:
    """The query's result, or None while Prometheus is still starting: it answers 503 until its
    storage is open, which on a loaded machine can be after swav already answers."""
    status, body = http("GET", f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    if status == 503:
        return None
    assert status == 200, body
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_compose_up_prometheus_scrapes_the_server(docker, swav_bin, png_dir, tmp_path):
    build(swav_bin, "cpu", "prometheus")
    swav_port, prometheus_port = free_port(), free_port()
    # docker/prometheus.yml with this run's port and a shorter interval, mounted over the shipped one.
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{swav_port}"]
    config_file = png_dir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"services": {"prometheus": {"volumes": [
        f"{config_file}:/etc/prometheus/prometheus.yml:ro"]}}}))
    project = f"swav-test-{uuid.uuid4().hex[:8]}"
    env = {"COMPOSE_PROJECT_NAME": project, "SWAV_API_KEY": KEY, "SWAV_PORT": str(swav_port),
           "PROMETHEUS_PORT": str(prometheus_port)}
    files = ["-f", "docker/compose.yaml", "-f", str(override)]
    try:
        docker_local("compose", *files, "up", "-d", "--no-build", timeout=300, env=env)
        png = fashion_mnist_pngs(png_dir, 1)[0]
        status, _ = http("POST", f"http://127.0.0.1:{swav_port}/v1/embed", png.read_bytes(), authed("image/png"))
        assert status == 200
        deadline, series = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            try:
                series = prometheus_query(prometheus_port, 'swav_http_requests_total{route="/v1/embed"}') or []
            except (urllib.error.URLError, ConnectionError):
                series = []
            if series and any(float(s["value"][1]) >= 1 for s in series):
                break
            time.sleep(1)
        assert series and any(float(s["value"][1]) >= 1 for s in series), series
        assert all(s["metric"]["instance"] == f"127.0.0.1:{swav_port}" for s in series), series
    finally:
        down = docker_local("compose", *files, "down", "--volumes", timeout=300, env=env)
    assert project not in run_docker(docker, "ps", "-a", "--format", "{{.Names}}").stdout, down.stderr
