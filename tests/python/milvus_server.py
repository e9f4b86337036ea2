"""A real Milvus 2.3.5 standalone server for the tests, and `swav serve` processes that use it.

The server is PyPI's embedded Milvus, installed in its own environment by scripts/setup-milvus
(SWAV_MILVUS_VENV, default .venv-milvus). Its servers listen on every interface, not only loopback,
so the tests run it inside a network namespace of their own that has nothing but a loopback
interface: nothing outside this machine's test can reach it. The namespace needs root (as the tests
run in CI); without it, or without the environment, the tests fail with the reason instead of
skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from repo_tools import REPO, fixture_bundle

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# Embedded Milvus starts in 10 to 60 s on a busy machine.
START_TIMEOUT_S = 240


def milvus_python() -> Path:
    venv = Path(os.environ.get("SWAV_MILVUS_VENV", REPO / ".venv-milvus"))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} not found: run scripts/setup-milvus (scripts/test does) or set SWAV_MILVUS_VENV")
    return python


@contextlib.contextmanager
def loopback_only_network() -> Iterator[None]:
    """Moves this thread (and the processes it starts) into a new network namespace whose only
    interface is loopback, and back afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            pytest.fail(f"cannot create a network namespace ({os.strerror(err)}): the Milvus tests need root, "
                        "to keep Milvus's listeners (on every interface) off the machine's network")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
        yield
    finally:
        if libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot return to the test's network namespace")
        os.close(home)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Milvus:
    """One Milvus server on 127.0.0.1:port with its data in base_dir; stop() and start() again is
    a restart that keeps the data."""

    def __init__(self, base_dir: Path, port: int) -> None:
        self.base_dir, self.port = base_dir, port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(self.base_dir.parent / f"launcher-{self.port}.log", "a")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen([str(milvus_python()), str(REPO / "tests/python/milvus_launcher.py"),
                                      str(self.base_dir), str(self.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != f"ready {self.port}":
            self.stop()
            pytest.fail(f"Milvus did not start: {line!r}; see {self.base_dir}/logs and the launcher log")

    def stop(self) -> None:
        """Stops the server (terminate, then kill after a second) and waits for it."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()

    def url(self, collection: str) -> str:
        return f"milvus://127.0.0.1:{self.port}/{collection}"


@contextlib.contextmanager
def milvus_server(tmp: Path) -> Iterator[Milvus]:
    server = Milvus(tmp / "milvus", free_port())
    server.base_dir.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def request(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, Message]:
    """(status, JSON body or {}, headers, by any case) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            is_json = r.headers.get_content_type() == "application/json"
            return r.status, json.loads(raw) if raw and is_json else {}, r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else {}, e.headers


def small_defaults(extra: tuple[str, ...]) -> list[str]:
    """One ONNX Runtime thread and small batches (the tiny bundle needs no more), unless `extra` sets them."""
    out = []
    for flag, value in (("--intra-threads", "1"), ("--max-batch-size", "8")):
        if flag not in extra:
            out += [flag, value]
    return out


class Swav:
    """A `swav serve` process, on the tiny gray fixture bundle unless `model` names another."""

    def __init__(self, binary: Path, index: str, *extra: str, model: Path | None = None) -> None:
        # A file, not a pipe: a pipe nobody reads would stall the server once its logs fill it.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="swav-serve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--model", str(model or fixture_bundle("tiny-gray")), "--listen", "127.0.0.1:0",
             "--device", "cpu", *small_defaults(extra), "--index", index, *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening on "):
            self.stop()
            pytest.fail(f"swav serve did not start: {line!r} {self.logs()[-3000:]}")
        self.base = "http://" + line.split()[-1]
        deadline = time.monotonic() + 120
        while request("GET", self.base + "/ready", timeout=10)[0] != 200:
            assert time.monotonic() < deadline, "swav serve did not become ready in 120 s"
            time.sleep(0.2)

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, Message]:
        return request(method, self.base + path, body, timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


@contextlib.contextmanager
def swav_serve(binary: Path, index: str, *extra: str, model: Path | None = None) -> Iterator[Swav]:
    server = Swav(binary, index, *extra, model=model)
    try:
        yield server
    finally:
        server.stop()


