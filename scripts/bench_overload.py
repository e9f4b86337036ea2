#!/usr/bin/env python3
"""Overload benchmarks of `swav serve`: goodput under multi-image overload, and a soak.

goodput: closed-loop wrk clients each sending 64 Fashion-MNIST PNGs per multipart request to
/v1/embed, at 8 clients (about the server's capacity) and at 64 (8x it), in alternating rounds.
Goodput counts only the images of 200 answers. The issue's target: goodput at 64 clients >= 0.8x
goodput at 8.

soak: for --soak-seconds, a mix of raw-image embeds, searches and item writes (wrk, one
connection per client, --soak-clients of them) against a server with an index. Every answer must
be 200, 429 or 503, and each 429/503 must carry Retry-After. RSS is sampled every 0.5 s and must
stay within 1.5x its value after the warm-up; /health is probed every 100 ms on a fresh
connection, and its p99 must stay under 50 ms.

Usage (from the repository root, after `cargo build --release`):
    .venv/bin/python scripts/bench_overload.py --model models/fashion-mnist
Needs: wrk, numpy and pillow.
"""
import argparse
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_serve  # noqa: E402
from bench_serve import ROOT, wait_http, write_pngs  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(binary: pathlib.Path, model: pathlib.Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [str(binary), "serve", "--model", str(model), "--device", "cpu", "--listen", f"127.0.0.1:{port}",
           "--log", "warn", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wait_http(f"http://127.0.0.1:{port}/ready")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wrk(url: str, script: str, env: dict, conns: int, seconds: int) -> str:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", str(ROOT / "benchmarks" / script), url]
    done = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return done.stdout


def goodput(url: str, listing: pathlib.Path, conns: int, seconds: int, per: int, honor: bool) -> dict:
    env = {"BENCH_LIST": str(listing), "BENCH_PER_REQUEST": str(per), "BENCH_HONOR_RETRY": "1" if honor else "0"}
    out = wrk(url, "wrk_images.lua", env, conns, seconds)
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    total, duration = int(m.group(1)), float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    return {"images_per_s": (total - refused) * per / duration, "requests": total, "refused": refused}


def run_goodput(args, listing: pathlib.Path) -> None:
    port = 18181
    proc = start(args.binary, args.model, port, args.swav_args.split())
    url = f"http://127.0.0.1:{port}/v1/embed"
    try:
        goodput(url, listing, 8, 3, args.per_request, False)  # warm-up
        # c=64 twice: clients that retry at once (wrk's way), and clients that wait Retry-After.
        points = [(8, False), (64, False), (64, True)]
        rounds = {p: [] for p in points}
        for r in range(args.rounds):
            for p in points if r % 2 == 0 else points[::-1]:
                rounds[p].append(goodput(url, listing, p[0], args.seconds, args.per_request, p[1]))
        peak = rss_mib(proc.pid)
    finally:
        stop(proc)
    med = {p: sorted(x["images_per_s"] for x in v)[len(v) // 2] for p, v in rounds.items()}
    for (c, honor), v in rounds.items():
        print(f"goodput c={c:>2}{' waiting Retry-After' if honor else ''}, {args.per_request} images/request: "
              + ", ".join(f"{x['images_per_s']:,.0f} img/s ({x['refused']}/{x['requests']} refused)" for x in v)
              + f"  median {med[(c, honor)]:,.0f}")
    base = med[(8, False)]
    print(f"goodput ratio c=64 / c=8: {med[(64, False)] / base:.2f} retrying at once, "
          f"{med[(64, True)] / base:.2f} waiting Retry-After (target >= 0.8); RSS at the end {peak:.0f} MiB")


def probe_health(port: int, stop_at: list, out: list) -> None:
    while not stop_at:
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            ok = data.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        out.append(((time.perf_counter() - started) * 1e3, ok))
        time.sleep(0.1)


def run_soak(args, listing: pathlib.Path) -> None:
    port = 18182
    with tempfile.TemporaryDirectory() as index:
        proc = start(args.binary, args.model, port, ["--index", index, *args.swav_args.split()])
        try:
            health, stop_flag, rss = [], [], []
            prober = threading.Thread(target=probe_health, args=(port, stop_flag, health), daemon=True)
            prober.start()

            def sample():
                while not stop_flag:
                    rss.append((time.monotonic(), rss_mib(proc.pid)))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            out = wrk(f"http://127.0.0.1:{port}", "wrk_mixed.lua", {"BENCH_LIST": str(listing)},
                      args.soak_clients, args.soak_seconds)
            stop_flag.append(True)
            prober.join()
            sampler.join()
        finally:
            stop(proc)
    mixed = json.loads(out.split("MIXED ", 1)[1].splitlines()[0])
    statuses = {int(k): v for k, v in mixed["statuses"].items()}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    warm = [m for t, m in rss if t - started >= args.warm_up]
    base, top = warm[0], max(warm)
    lat = sorted(ms for ms, _ in health)
    p99 = lat[min(len(lat) - 1, len(lat) * 99 // 100)]
    failed = sum(1 for _, ok in health if not ok)
    served = statuses.get(200, 0)
    print(f"soak: {args.soak_seconds} s, {args.soak_clients} clients, {rps} answers/s; statuses {dict(sorted(statuses.items()))}; "
          f"offered/served {sum(statuses.values()) / max(served, 1):.1f}x")
    print(f"soak: 429/503 without Retry-After: {mixed['missing_retry_after']}; "
          f"other statuses: {sum(v for k, v in statuses.items() if k not in (200, 429, 503))}")
    print(f"soak: RSS after {args.warm_up} s warm-up {base:.0f} MiB, max after {top:.0f} MiB ({top / base:.2f}x, limit 1.5x)")
    print(f"soak: /health p50 {lat[len(lat) // 2]:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms over {len(lat)} probes, "
          f"{failed} failed (limit p99 < 50 ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, default=ROOT / "models/fashion-mnist")
    p.add_argument("--binary", type=pathlib.Path, default=ROOT / "target/release/swav")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--per-request", type=int, default=64)
    p.add_argument("--seconds", type=int, default=10, help="per goodput point")
    p.add_argument("--rounds", type=int, default=3, help="alternating goodput rounds")
    p.add_argument("--soak-seconds", type=int, default=60)
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--warm-up", type=float, default=10.0, help="seconds of the soak before the RSS baseline")
    p.add_argument("--only", choices=["goodput", "soak"])
    p.add_argument("--swav-args", default="", help="extra flags for swav serve")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}")
    if not bench_serve.FMNIST.exists():
        # The bundle's folder may carry the test images too.
        bench_serve.FMNIST = args.model / "t10k-images-idx3-ubyte.gz"
    with tempfile.TemporaryDirectory() as tmp:
        listing = write_pngs(pathlib.Path(tmp), args.images)
        if args.only in (None, "goodput"):
            run_goodput(args, listing)
        if args.only in (None, "soak"):
            run_soak(args, listing)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
