#!/usr/bin/env python3
"""Serving benchmark: swav serve vs onnxruntime alone vs a minimal FastAPI peer, one run, side by side.

Load: wrk (closed loop, one connection per concurrent client) on loopback, POSTing Fashion-MNIST
test images as PNG (a different image each request) to /v1/embed as raw image/png bodies.

Usage (from the repository root, after `cargo build --release`):
    .venv/bin/python scripts/bench_serve.py --model models/fashion-mnist
Needs: wrk, and numpy, pillow, onnxruntime, fastapi, uvicorn in the Python environment.
"""
import argparse
import gzip
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def write_pngs(out: pathlib.Path, n: int) -> pathlib.Path:
    from PIL import Image

    with gzip.open(FMNIST, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(n):
        p = out / f"{i:05d}.png"
        Image.fromarray(data[i], "L").save(p)
        paths.append(str(p))
    listing = out / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never became ready")


def wrk(url: str, listing: pathlib.Path, conns: int, seconds: int, per_request: int = 1) -> dict:
    """One closed-loop point; rps counts images (requests × images per request)."""
    env = dict(os.environ, BENCH_LIST=str(listing), BENCH_PER_REQUEST=str(per_request))
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s",
           "-s", str(ROOT / "benchmarks/wrk_images.lua"), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) * per_request
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": pct("50"), "p99": pct("99"), "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_server(name: str, cmd: list[str], ready_url: str, url: str, listing, args) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_http(ready_url)
        wrk(url, listing, 8, 2)  # warm-up
        results = {c: wrk(url, listing, c, args.seconds) for c in args.concurrency}
        if args.group > 1 and name == "swav":
            results["grouped"] = {c: wrk(url, listing, c, args.seconds, args.group) for c in (4, 8)}
        results["rss"] = peak_rss_mib(proc.pid)
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ort_alone(model: pathlib.Path, listing: pathlib.Path, threads: int, seconds: float) -> dict:
    import onnxruntime as ort
    from PIL import Image

    manifest = json.loads((model / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # The server's setting: no spinning intra-op threads.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model / manifest["model_file"]), opts, providers=["CPUExecutionProvider"])
    files = listing.read_text().split()
    # The bundle's own preprocessing rule (the trainer's), so that the tensors have the model's input
    # size whatever the images' size.
    sys.path.append(str(ROOT / "training" / "src"))
    from swav_train.preprocess import InputSpec, to_array

    spec = InputSpec.from_manifest(manifest["input"])
    tensors = np.stack([to_array(Image.open(f), spec) for f in files])
    best = {}
    for bs in (1, 8, 16, 32, 64, 128):
        sess.run(["embedding"], {"images": tensors[:bs]})
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            batch = tensors[i:i + bs] if i + bs <= len(tensors) else tensors[:bs]
            i = (i + bs) % (len(tensors) - bs)
            sess.run(["embedding"], {"images": batch})
            done += bs
        best[bs] = done / (time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, default=ROOT / "models/fashion-mnist")
    p.add_argument("--binary", type=pathlib.Path, default=ROOT / "target/release/swav")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ORT intra-op threads for all three")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256],
                   help="closed-loop clients per point; the peer targets are read at 64, capacity at the best point")
    p.add_argument("--swav-args", default="", help="extra flags for swav serve")
    p.add_argument("--group", type=int, default=32,
                   help="also measure requests carrying this many images (multipart) at c=4 and 8; 1 to skip")
    args = p.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    print(f"model: {args.model} ({manifest['name']}, {manifest.get('backbone')}, "
          f"{manifest['input']['channels']}x{manifest['input']['height']}x{manifest['input']['width']})")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"machine: {os.cpu_count()} cores; ORT intra-op threads {args.threads}; wrk -t1, {args.seconds}s per point")

    with tempfile.TemporaryDirectory() as tmp:
        listing = write_pngs(pathlib.Path(tmp), args.images)
        swav_port, peer_port = 18081, 18099
        swav = run_server(
            "swav",
            [str(args.binary), "serve", "--model", str(args.model), "--device", "cpu",
             "--listen", f"127.0.0.1:{swav_port}", "--intra-threads", str(args.threads), "--log", "warn",
             *args.swav_args.split()],
            f"http://127.0.0.1:{swav_port}/ready", f"http://127.0.0.1:{swav_port}/v1/embed", listing, args)
        peer = run_server(
            "fastapi",
            [sys.executable, str(ROOT / "benchmarks/fastapi_peer.py"), "--model", str(args.model),
             "--port", str(peer_port), "--threads", str(args.threads)],
            f"http://127.0.0.1:{peer_port}/docs", f"http://127.0.0.1:{peer_port}/v1/embed", listing, args)
        alone = ort_alone(args.model, listing, args.threads, 3.0)

    best_bs = max(alone, key=alone.get)
    print("\nonnxruntime alone (pre-decoded tensors), images/s by batch size: "
          + ", ".join(f"{bs}: {v:,.0f}" for bs, v in alone.items()) + f"  -> best {best_bs}")
    print(f"\n{'conc':>5} | {'swav img/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'fastapi img/s':>13} {'p50 ms':>8} {'p99 ms':>8} | {'swav/peer':>9} {'swav/ORT':>8}")
    for c in args.concurrency:
        s, f = swav[c], peer[c]
        print(f"{c:>5} | {s['rps']:>10,.0f} {s['p50']:>8.2f} {s['p99']:>8.2f} | {f['rps']:>13,.0f} {f['p50']:>8.2f} {f['p99']:>8.2f} |"
              f" {s['rps'] / f['rps']:>8.2f}x {s['rps'] / alone[best_bs]:>7.2f}x")
        for name, r in (("swav", s), ("fastapi", f)):
            if r["non2xx"] or r["socket_errors"]:
                print(f"      {name}: non-2xx {r['non2xx']}, socket errors {r['socket_errors']}")
    c = 64 if 64 in args.concurrency else max(args.concurrency)
    print(f"\nat c={c}: throughput swav/peer {swav[c]['rps'] / peer[c]['rps']:.2f}x (target >= 3), "
          f"p99 swav/peer {swav[c]['p99'] / peer[c]['p99']:.3f} (target <= 0.333), "
          f"swav/ORT-alone {swav[c]['rps'] / alone[best_bs]:.2f}x")
    # Capacity: a closed loop of c clients caps the batch at c, so the server's throughput is
    # read at its best point, as onnxruntime alone is read at its best batch size.
    top = max(args.concurrency, key=lambda k: swav[k]["rps"])
    print(f"capacity: swav best {swav[top]['rps']:,.0f} img/s at c={top} (p99 {swav[top]['p99']:.1f} ms) "
          f"= {swav[top]['rps'] / alone[best_bs]:.2f}x onnxruntime alone at batch {best_bs} (target >= 0.8)")
    if args.group > 1:
        for c, r in swav["grouped"].items():
            print(f"grouped: {args.group} images per multipart request, c={c}: swav {r['rps']:,.0f} img/s "
                  f"(p99 {r['p99']:.1f} ms per request) = {r['rps'] / alone[best_bs]:.2f}x onnxruntime alone"
                  + (f"; non-2xx {r['non2xx']}" if r["non2xx"] else ""))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"peak RSS: swav {swav['rss']:.0f} MiB, fastapi peer {peer['rss']:.0f} MiB")


if __name__ == "__main__":
    main()
