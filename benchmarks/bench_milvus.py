#!/usr/bin/env python3
"""The index in Milvus against swav's own index (issue 19), every figure from one run on one machine.

1. The 10,000 Fashion-MNIST test images as PNGs (`swav dataset fashion-mnist --split test`).
2. `swav index build` of them into a fresh directory and into a fresh Milvus collection, alternating
   (the order swapped each round), `--build-rounds` times: images/s and the build's peak RSS.
3. `swav serve` on each (the last round's directory and collection): one on the directory and one
   on the collection per `--consistency` level (`--milvus-consistency`; default: strong only), all
   running, loaded in turn: `POST /v1/search?k=10` with a JSON vector (embeddings of test images,
   from /v1/embed; a different one each request) from wrk at `--concurrency` connections for
   `--seconds`, the servers' order rotated each of the `--serve-rounds` rounds: queries/s, p50 and
   p99, each against the local index's point of the same round, the server's RSS when ready and its
   peak after the load, and the Milvus server's RSS.

Milvus is PyPI's embedded Milvus 2.3.5 standalone (scripts/setup-milvus's environment), started as
the tests start it (tests/python/milvus_server.py): inside a network namespace with only a loopback
interface, because it listens on every interface. Everything runs on this machine: Milvus, swav and
wrk share its cores, so the Milvus side pays for Milvus's CPU time too.

Run from the repository root, as root (for the network namespace), after
`cargo build --release --bin swav` and `scripts/setup-milvus`:
    .venv/bin/python benchmarks/bench_milvus.py [--model models/fashion-mnist] [--work var/bench-milvus] \
        [--consistency strong --consistency session ...]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from milvus_server import loopback_only_network, milvus_server  # after the path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants (the Milvus launcher and its server)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += status_kib(pid, "VmRSS")
        except (OSError, RuntimeError):
            pass  # gone, or a zombie
    return total / 1024


def index_build(swav: Path, model: Path, images: Path, out: str) -> dict:
    """One `swav index build`: seconds, its report, and its peak RSS (from wait4's rusage)."""
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([str(swav), "index", "build", "--model", str(model), "--device", "cpu", "--input", str(images),
                                 "--out", out, "--no-progress"], stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=images.parent)  # a build into Milvus writes its refused files' list here
        assert proc.stdout is not None
        out_text = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"swav index build --out {out} failed:\n{err.read()[-3000:]}")
    return {"seconds": seconds, "report": json.loads(out_text.strip().splitlines()[-1]), "peak_rss_mib": usage.ru_maxrss / 1024}


class Server:
    """`swav serve` on one index location, with its defaults otherwise (and `extra` flags)."""

    def __init__(self, swav: Path, model: Path, index: str, *extra: str) -> None:
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(swav), "serve", "--model", str(model), "--index", index, "--listen", "127.0.0.1:0",
                                      "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening on "):
            self.log.seek(0)
            sys.exit(f"swav serve --index {index} did not start: {line!r}\n{self.log.read()[-3000:]}")
        self.base = "http://" + line.split()[-1]
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(self.base + "/ready", timeout=10).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"swav serve --index {index} was not ready in 180 s")
            time.sleep(0.2)
        self.rss_ready_mib = status_kib(self.proc.pid, "VmRSS") / 1024

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def wrk(url: str, bodies: Path, conns: int, seconds: int) -> dict:
    """One closed-loop point of wrk (one thread) on `url`."""
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(ROOT / "benchmarks/wrk_images.lua"), url]
    out = subprocess.run(cmd, env={**os.environ, "BENCH_BODIES": str(bodies)}, capture_output=True, text=True, check=True).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"qps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


CONSISTENCY_LEVELS = ["strong", "session", "bounded", "eventually"]


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/fashion-mnist"))
    ap.add_argument("--work", type=Path, default=Path("var/bench-milvus"))
    ap.add_argument("--swav", type=Path, default=Path("target/release/swav"))
    ap.add_argument("--build-rounds", type=int, default=3, help="alternating local / Milvus builds of the 10k images")
    ap.add_argument("--serve-rounds", type=int, default=3, help="alternating wrk points on the two servers")
    ap.add_argument("--concurrency", type=int, default=16, help="wrk connections")
    ap.add_argument("--seconds", type=int, default=8, help="wrk duration per point")
    ap.add_argument("--queries", type=int, default=2000, help="distinct query vectors (test images' embeddings)")
    ap.add_argument("--limit", type=int, default=None, help="index only an even spread of N of the images (smoke runs)")
    ap.add_argument("--consistency", action="append", choices=CONSISTENCY_LEVELS, default=None,
                    help="a Milvus-backed server at this --milvus-consistency level (repeatable; default: strong)")
    args = ap.parse_args()
    levels = list(dict.fromkeys(args.consistency or ["strong"]))
    if not (args.model / "manifest.json").is_file():
        sys.exit(f"no model bundle at {args.model}; pass --model DIR")
    if not args.swav.is_file():
        sys.exit(f"{args.swav} is missing: cargo build --release --bin swav")
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing (scripts/setup installs it)")
    swav, model = args.swav.resolve(), args.model.resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images = work / "test"
    log("dataset: " + subprocess.run([str(swav), "dataset", "fashion-mnist", "--split", "test", "--out", str(images)],
                                     check=True, capture_output=True, text=True).stdout.strip())
    pngs = sorted(images.rglob("*.png"))
    if args.limit is not None:
        pngs = pngs[:: max(1, len(pngs) // args.limit)][: args.limit]
    # A list of files for `swav index build --input` (paths relative to the list's folder, as ids).
    listing = work / "images.txt"
    listing.write_text("".join(f"{p.relative_to(work)}\n" for p in pngs))
    n_images = len(pngs)
    manifest = json.loads((model / "manifest.json").read_text())
    result: dict = {"model": manifest["name"], "images": n_images, "cpus": os.cpu_count(), "binary": str(args.swav),
                    "consistency_levels": levels, "load_average_before": load_average()}
    log(f"load average before: {result['load_average_before']}")

    milvus_dir = Path(tempfile.mkdtemp(prefix="bench-milvus-", dir=work))
    try:
        with loopback_only_network(), milvus_server(milvus_dir) as milvus:
            assert milvus.proc is not None
            result["milvus_rss_idle_mib"] = tree_rss_mib(milvus.proc.pid)
            run = uuid.uuid4().hex[:8]
            local_dir = work / "index"

            # 2. builds, alternating which goes first.
            builds: dict[str, list[dict]] = {"local": [], "milvus": []}
            for r in range(args.build_rounds):
                url = milvus.url(f"bench_{run}_{r}")
                shutil.rmtree(local_dir, ignore_errors=True)
                targets = [("local", str(local_dir)), ("milvus", url)]
                for name, out in targets if r % 2 == 0 else targets[::-1]:
                    b = index_build(swav, model, listing, out)
                    assert b["report"]["indexed"] == n_images, b
                    b["images_per_second"] = n_images / b["seconds"]
                    builds[name].append(b)
                    log(f"build round {r + 1} {name}: {b['seconds']:.1f} s, {b['images_per_second']:,.0f} images/s, "
                        f"peak RSS {b['peak_rss_mib']:.0f} MiB")
            result["build"] = {name: {"rounds": [{k: v for k, v in b.items() if k != "report"} for b in rounds],
                                      "median_images_per_second": median([b["images_per_second"] for b in rounds])}
                               for name, rounds in builds.items()}
            result["build"]["milvus_over_local"] = median(
                [m["images_per_second"] / lo["images_per_second"] for lo, m in zip(builds["local"], builds["milvus"])])
            result["milvus_rss_after_builds_mib"] = tree_rss_mib(milvus.proc.pid)

            # 3. serving, every server up, loaded in turn.
            servers = {"local": Server(swav, model, str(local_dir))}
            try:
                for level in levels:
                    servers[f"milvus {level}"] = Server(swav, model, url, "--milvus-consistency", level)
                step = max(1, len(pngs) // args.queries)
                chosen = pngs[::step][: args.queries]
                bodies = work / "vectors.jsonl"
                with bodies.open("w") as f:
                    for start in range(0, len(chosen), 64):
                        batch = [base64.b64encode(p.read_bytes()).decode() for p in chosen[start:start + 64]]
                        for v in servers["local"].post("/v1/embed", {"images": batch})["embeddings"]:
                            f.write(json.dumps({"vector": v}) + "\n")
                points: dict[str, list[dict]] = {name: [] for name in servers}
                for name, srv in servers.items():
                    wrk(srv.base + "/v1/search?k=10", bodies, args.concurrency, 2)  # warm-up, not kept
                names = list(servers)
                for r in range(args.serve_rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for name in order:
                        p = wrk(servers[name].base + "/v1/search?k=10", bodies, args.concurrency, args.seconds)
                        points[name].append(p)
                        log(f"search round {r + 1} {name}: {p['qps']:,.0f} queries/s, p50 {p['p50_ms']:.1f} ms, "
                            f"p99 {p['p99_ms']:.1f} ms, non-2xx {p['non2xx']}")
                result["search"] = {name: {"rounds": rounds, "median_qps": median([p["qps"] for p in rounds]),
                                           "median_p99_ms": median([p["p99_ms"] for p in rounds]),
                                           "rss_ready_mib": servers[name].rss_ready_mib,
                                           "rss_peak_mib": status_kib(servers[name].proc.pid, "VmHWM") / 1024}
                                    for name, rounds in points.items()}
                for name in names[1:]:
                    result["search"][name]["over_local_qps"] = median(
                        [m["qps"] / lo["qps"] for lo, m in zip(points["local"], points[name])])
                    result["search"][name]["over_local_p99"] = median(
                        [m["p99_ms"] / lo["p99_ms"] for lo, m in zip(points["local"], points[name])])
                result["milvus_rss_after_search_mib"] = tree_rss_mib(milvus.proc.pid)
            finally:
                for srv in servers.values():
                    srv.stop()
    finally:
        shutil.rmtree(milvus_dir, ignore_errors=True)
    result["load_average_after"] = load_average()
    print_table(result, args)
    print(json.dumps(result, indent=2))


def print_table(r: dict, args: argparse.Namespace) -> None:
    b, s = r["build"], r["search"]
    lines = [
        f"model {r['model']}, {r['images']:,} images, {r['cpus']} cores, binary {r['binary']}",
        f"load average before {r['load_average_before']}, after {r['load_average_after']}",
        "",
        "swav index build (images/s per round; peak RSS of the build process)",
    ]
    for name in ("local", "milvus"):
        rounds = ", ".join(f"{x['images_per_second']:,.0f}" for x in b[name]["rounds"])
        rss = max(x["peak_rss_mib"] for x in b[name]["rounds"])
        lines.append(f"  {name:6} {rounds}  median {b[name]['median_images_per_second']:,.0f}  peak RSS {rss:.0f} MiB")
    lines += [f"  Milvus / local (median of the rounds' ratios): {b['milvus_over_local']:.2f}x", "",
              f"POST /v1/search?k=10 by vector, wrk -c{args.concurrency}, {args.seconds} s per point (queries/s, p50, p99 ms)"]
    for name in s:
        rounds = ", ".join(f"{p['qps']:,.0f} ({p['p50_ms']:.1f}, {p['p99_ms']:.1f})" for p in s[name]["rounds"])
        lines.append(f"  {name:17} {rounds}  median {s[name]['median_qps']:,.0f} q/s, p99 {s[name]['median_p99_ms']:.1f} ms; "
                     f"RSS ready {s[name]['rss_ready_mib']:.0f} MiB, peak {s[name]['rss_peak_mib']:.0f} MiB")
    for name in list(s)[1:]:
        lines.append(f"  {name} / local: queries/s {s[name]['over_local_qps']:.3f}x, p99 {s[name]['over_local_p99']:.1f}x")
    lines += [f"Milvus server (launcher + milvus) RSS: idle {r['milvus_rss_idle_mib']:.0f} MiB, after the builds "
              f"{r['milvus_rss_after_builds_mib']:.0f} MiB, after the searches {r['milvus_rss_after_search_mib']:.0f} MiB"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
