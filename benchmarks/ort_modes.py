#!/usr/bin/env python3
"""onnxruntime alone, on pre-decoded tensors, in the thread layouts swav can use on this machine.

One session with 2 intra-op threads (swav serve's default, spinning off as the server sets it, and
with spinning on), and two single-threaded sessions run side by side (`--workers 2 --intra-threads 1`,
the layout `swav index build` uses on 2 cores). Prints images/s by batch size for each.

    .venv/bin/python benchmarks/ort_modes.py [--model models/fashion-mnist] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(model: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    manifest = json.loads((model / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model / manifest["model_file"]), opts, providers=["CPUExecutionProvider"])


def images_per_second(sessions: list[ort.InferenceSession], batch: np.ndarray, seconds: float) -> float:
    """Every session runs `batch` in a loop on its own thread (onnxruntime releases the GIL)."""
    counts = [0] * len(sessions)
    for s in sessions:
        s.run(None, {"images": batch})
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, {"images": batch})
            counts[i] += len(batch)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/fashion-mnist"))
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    spec = json.loads((args.model / "manifest.json").read_text())["input"]
    rng = np.random.default_rng(0)
    tensors = rng.random((128, spec["channels"], spec["height"], spec["width"]), dtype=np.float32)
    layouts = {
        "1 session x 2 threads, no spinning": lambda: [session(args.model, 2, False)],
        "1 session x 2 threads, spinning": lambda: [session(args.model, 2, True)],
        "2 sessions x 1 thread": lambda: [session(args.model, 1, False), session(args.model, 1, False)],
    }
    print(f"model: {args.model}; images/s by batch size, {args.seconds:g} s per point")
    for name, make in layouts.items():
        sessions = make()
        row = {bs: images_per_second(sessions, tensors[:bs], args.seconds) for bs in (32, 64, 128)}
        print(f"{name:38s} " + "  ".join(f"{bs}: {v:,.0f}" for bs, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
