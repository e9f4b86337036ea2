#!/usr/bin/env python3
"""Serving an imported ResNet-50 (the paper's model size): `swav serve` at c = 16 against onnxruntime
alone on the same preprocessed tensors, in alternating rounds (other work on the machine shifts
both sides of a round alike).

The checkpoint has the released RN50's layout and sizes (3,000 prototypes, 2048-2048-128 head) with
random weights: speed does not depend on the values. Photos are photo-sized JPEGs (random crops of
tests/fixtures/preprocess/photo.jpg, scaled to about 500x375), POSTed one per request.

Usage (from the repository root, after `cargo build --release` and scripts/setup-train):
    .venv/bin/python benchmarks/bench_imported.py --rounds 3
Needs: wrk.
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_serve import wait_http, wrk  # noqa: E402


def make_photos(out: pathlib.Path, n: int) -> pathlib.Path:
    from PIL import Image

    src = Image.open(ROOT / "tests/fixtures/preprocess/photo.jpg").convert("RGB")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BILINEAR)
        p = out / f"{i:03d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    listing = out / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def import_rn50(out: pathlib.Path, binary: pathlib.Path) -> pathlib.Path:
    import torch

    from swav_train.importers import synthetic

    ckpt = out / "swav_rn50_random.pth.tar"
    torch.save(synthetic.official_state(), ckpt)
    bundle = out / "bundle"
    subprocess.run([str(binary), "import", "--", str(ckpt), "--out", str(bundle)], check=True,
                   env={**os.environ, "SWAV_PYTHON": sys.executable})
    return bundle


def swav_round(binary, bundle, listing, threads, conc, seconds, port) -> dict:
    cmd = [str(binary), "serve", "--model", str(bundle), "--device", "cpu", "--listen", f"127.0.0.1:{port}",
           "--intra-threads", str(threads), "--log", "warn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=300)
        url = f"http://127.0.0.1:{port}/v1/embed"
        wrk(url, listing, conc, 3)  # warm-up
        return wrk(url, listing, conc, seconds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def ort_round(bundle, tensors, threads, batch_sizes, seconds) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the server
    sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for bs in batch_sizes:
        sess.run(names, {"images": tensors[:bs]})
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            idx = [(i + k) % len(tensors) for k in range(bs)]
            sess.run(names, {"images": tensors[idx]})
            done, i = done + bs, (i + bs) % len(tensors)
        out[bs] = done / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", type=pathlib.Path, default=ROOT / "target/release/swav")
    p.add_argument("--bundle", type=pathlib.Path, default=None, help="an imported bundle (default: import one)")
    p.add_argument("--photos", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    args = p.parse_args()
    from swav_train import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        listing = make_photos(tmp, args.photos)
        bundle = args.bundle or import_rn50(tmp, args.binary)
        manifest = json.loads((bundle / "manifest.json").read_text())
        inp = manifest["input"]
        spec = preprocess.InputSpec.from_manifest(inp)
        tensors = np.stack([preprocess.load_array(f, spec) for f in listing.read_text().split()])
        print(f"model: {manifest['name']} ({manifest['backbone']}, {inp['channels']}x{inp['height']}x{inp['width']}, "
              f"resize {inp['resize']['size']}); {args.photos} photos of 500x375 as JPEG")
        print(f"machine: {os.cpu_count()} cores; intra-op threads {args.threads}; wrk -t1 -c{args.concurrency}, "
              f"{args.seconds}s per point; load average before {os.getloadavg()[0]:.1f}")
        ratios = []
        for r in range(args.rounds):
            s = swav_round(args.binary, bundle, listing, args.threads, args.concurrency, args.seconds, 18181)
            alone = ort_round(bundle, tensors, args.threads, args.batch_sizes, args.seconds / len(args.batch_sizes))
            best = max(alone, key=alone.get)
            ratios.append(s["rps"] / alone[best])
            print(f"round {r + 1}: swav serve c={args.concurrency}: {s['rps']:.1f} img/s (p50 {s['p50']:.0f} ms, "
                  f"p99 {s['p99']:.0f} ms, non-2xx {s['non2xx']}); onnxruntime alone: "
                  + ", ".join(f"batch {bs}: {v:.1f}" for bs, v in alone.items())
                  + f" img/s -> swav/ORT {ratios[-1]:.2f}x (best batch {best})", flush=True)
        print(f"swav/ORT-alone by round: {', '.join(f'{x:.2f}' for x in ratios)}; median {np.median(ratios):.2f}x "
              f"(target >= 0.8); load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
