#!/usr/bin/env python3
"""Runs `swav serve` on CUDA and on the CPU with the same model and library, checks that their
embeddings agree (cosine >= 0.999 per image) and measures images/s with requests of 1, 32 and 256 images.

Called by scripts/gpu_check.sh on a GPU machine; needs only python3 with numpy and Pillow.
Exit status 1 when CUDA cannot be used or the embeddings disagree.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import io
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

BATCHES = (1, 32, 256)
MIN_COSINE = 0.999


def load_pngs(idx: Path | None, count: int) -> list[bytes]:
    """PNG files of the first `count` Fashion-MNIST test images, or of seeded noise without the IDX file."""
    if idx is not None and idx.is_file():
        with gzip.open(idx, "rb") as f:
            data = f.read()
        images = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
        source = str(idx)
    else:
        images = np.random.default_rng(0).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        source = "seeded noise (no IDX file)"
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    print(f"{len(pngs)} images from {source}")
    return pngs


def serve_command(binary: Path, model: Path, ort_lib: Path, device: str) -> list[str]:
    """`swav serve` on a free loopback port, taking requests of up to the largest batch measured."""
    return [
        str(binary), "serve", "--model", str(model), "--device", device, "--ort-lib", str(ort_lib),
        "--listen", "127.0.0.1:0", "--max-batch-size", str(max(BATCHES)),
        "--max-images-per-request", str(max(BATCHES)), "--max-body-bytes", str(64 << 20), "--queue-capacity", "8192",
    ]  # fmt: skip


class Server:
    """One `swav serve` process on a free loopback port; its output is kept for error messages."""

    def __init__(self, args: argparse.Namespace, device: str):
        self.device = device
        self.lines: list[str] = []
        self.address: str | None = None
        cmd = serve_command(args.bin, args.model, args.ort_lib, device)
        print("$ " + " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            match = re.search(r"listening on (\S+)", line)
            if match:
                self.address = match.group(1)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with status {self.proc.returncode} before it was ready")
            if self.address and self.request("GET", "/ready")[0] == 200:
                return
            time.sleep(0.2)
        self.fail(f"not ready after {timeout:.0f} s")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""
        finally:
            conn.close()

    def fail(self, why: str) -> None:
        tail = "\n".join(self.lines[-30:])
        raise SystemExit(f"error: swav serve --device {self.device} {why}; its last output:\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def embed_body(pngs: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(p).decode() for p in pngs]}).encode()


def embeddings(server: Server, pngs: list[bytes]) -> np.ndarray:
    status, body = server.request("POST", "/v1/embed", embed_body(pngs))
    if status != 200:
        server.fail(f"answered /v1/embed with {status}: {body[:300]!r}")
    return np.asarray(json.loads(body)["embeddings"], dtype=np.float64)


def throughput(server: Server, pngs: list[bytes], batch: int, seconds: float, concurrency: int) -> dict:
    """Images/s and request latency with `concurrency` clients, each on one keep-alive connection."""
    body = embed_body(pngs[:batch])
    host, port = server.address.rsplit(":", 1)

    def client(deadline: float) -> list[float]:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        latencies = []
        while time.monotonic() < deadline:
            start = time.perf_counter()
            conn.request("POST", "/v1/embed", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"error: /v1/embed answered {response.status} at batch {batch}")
            latencies.append(time.perf_counter() - start)
        conn.close()
        return latencies

    client(time.monotonic() + 0.5)  # warm-up: first batches of this size, connection set-up
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        runs = list(pool.map(client, [time.monotonic() + seconds] * concurrency))
        elapsed = time.perf_counter() - start
    latencies = sorted(x for run in runs for x in run)
    return {
        "batch": batch,
        "requests": len(latencies),
        "images_per_s": round(len(latencies) * batch / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
    }


def measure(args: argparse.Namespace, device: str, pngs: list[bytes]) -> dict:
    server = Server(args, device)
    try:
        server.wait_ready(args.ready_timeout)
        status, body = server.request("GET", "/v1/model")
        provider = json.loads(body).get("execution_provider", "?") if status == 200 else "?"
        if device == "cuda" and "cuda" not in provider.lower():
            server.fail(f"runs on {provider!r}, not CUDA")
        result = {"device": device, "execution_provider": provider, "embeddings": embeddings(server, pngs)}
        result["throughput"] = [throughput(server, pngs, b, args.seconds, args.concurrency) for b in BATCHES]
        for row in result["throughput"]:
            print(f"{device:>4} batch {row['batch']:>3}: {row['images_per_s']:>9.1f} images/s, p50 {row['p50_ms']} ms")
        return result
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--ort-lib", type=Path, required=True, help="onnxruntime-gpu's libonnxruntime.so")
    parser.add_argument("--images", type=Path, default=None, help="t10k-images-idx3-ubyte.gz")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per batch size")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--devices", default="cuda,cpu",
                        help="the device measured and the one it is compared with (cpu,cpu tests this script)")
    args = parser.parse_args(argv)

    devices = args.devices.split(",")
    if len(devices) != 2:
        parser.error("--devices takes two devices, e.g. cuda,cpu")
    pngs = load_pngs(args.images, max(BATCHES))
    measured, reference = (measure(args, device, pngs) for device in devices)
    a, b = measured.pop("embeddings"), reference.pop("embeddings")
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    summary = {"images": len(pngs), "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
               "measured": measured, "reference": reference}  # fmt: skip
    first, second = (f"{d} ({r['execution_provider']})" for d, r in zip(devices, (measured, reference)))
    print(f"embeddings {first} vs {second} over {len(pngs)} images: "
          f"min cosine {cosine.min():.6f}, mean {cosine.mean():.6f}")
    print(f"batch | {devices[0]} images/s | {devices[1]} images/s | ratio")
    for g, c in zip(measured["throughput"], reference["throughput"]):
        print(f"{g['batch']:>5} | {g['images_per_s']:>11.1f} | {c['images_per_s']:>11.1f} | "
              f"{g['images_per_s'] / c['images_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if cosine.min() < MIN_COSINE:
        print(f"FAILED: embeddings differ (min cosine {cosine.min():.6f} < {MIN_COSINE})")
        return 1
    print(f"OK: {devices[0]} embeddings equal the {devices[1]} ones")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
