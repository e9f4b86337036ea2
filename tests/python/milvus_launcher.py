"""Runs PyPI's embedded Milvus standalone (the `milvus` package) until its standard input closes.

Run by the Milvus environment's interpreter (scripts/setup-milvus), not the trainer's:
    python milvus_launcher.py BASE_DIR PORT
It prints `ready PORT` once Milvus answers, and stops the server when stdin reaches its end (the
test closed it, or died). Data stays in BASE_DIR, so a second launch on it is a restart.
"""

from __future__ import annotations

import socket
import sys

from milvus import MilvusServer, MilvusServerConfig


def bind_reusable(self: MilvusServerConfig, port: int) -> socket.socket | None:
    """The package's port probe, with SO_REUSEADDR as Milvus's own listeners have it: without it a
    restart on the same port fails while the last run's connections sit in TIME_WAIT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        return sock
    except OSError:
        sock.close()
        return None


def main() -> None:
    base_dir, port = sys.argv[1], int(sys.argv[2])
    MilvusServerConfig.try_bind_port = bind_reusable  # type: ignore[method-assign]
    server = MilvusServer(wait_for_started=True)
    server.set_base_dir(base_dir)
    server.listen_port = port
    server.start()
    try:
        print(f"ready {server.listen_port}", flush=True)
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
