#!/usr/bin/env python3
"""onnxruntime's CPU cost per image of ResNet-18 variants for 28×28 grayscale input, beside the
default bundle's model in the same run: what a cheaper default model would save in `swav index build`
and in serving (BENCHMARKS.md, "Index"). The variants carry the default model's head (hidden 512,
d 128, K 256) and *untrained* weights: the cost of a convolution does not depend on its weights.

Run from the repository root, after `scripts/setup-train`:
    .venv/bin/python benchmarks/model_cost_probe.py [--bundle models/fashion-mnist]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training" / "src"))
from swav_train.export import export_onnx  # noqa: E402
from swav_train.model import InferenceModel, SwAVModel  # noqa: E402

# name: (width, small stem, stride of the small stem's 3×3 conv)
VARIANTS = {
    "width 8, 3x3 stem at stride 1 (the default's architecture)": (8, True, 1),
    "width 8, 3x3 stem at stride 2": (8, True, 2),
    "width 16, 3x3 stem at stride 1": (16, True, 1),
    "width 16, 3x3 stem at stride 2": (16, True, 2),
    "width 8, torchvision stem (7x7 stride 2 + max-pool)": (8, False, 1),
}


def variant(width: int, small_stem: bool, stem_stride: int) -> InferenceModel:
    model = SwAVModel("resnet18", width, 1, small_stem, 512, 128, 256)
    if small_stem and stem_stride != 1:
        model.backbone.conv1 = torch.nn.Conv2d(1, width, 3, stride=stem_stride, padding=1, bias=False)
    return InferenceModel(model.eval(), (0.286,), (0.353,))


def micros_per_image(path: Path, batch: int, calls: int) -> float:
    """Best of 3 timed runs, one intra-op thread (as `swav index build` runs one session per core)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
    for _ in range(20):
        session.run(None, {"images": x})
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            session.run(None, {"images": x})
        best = min(best, (time.perf_counter() - t) / calls / batch * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/fashion-mnist"), help="the baseline bundle")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calls", type=int, default=100, help="timed calls per run")
    args = ap.parse_args()
    torch.manual_seed(0)
    baseline = micros_per_image(args.bundle / "model.onnx", args.batch, args.calls)
    print(f"{args.bundle} (trained): {baseline:.1f} us/image")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (width, small_stem, stride) in VARIANTS.items():
            path = Path(tmp) / "model.onnx"
            export_onnx(variant(width, small_stem, stride), 1, 28, path)
            us = micros_per_image(path, args.batch, args.calls)
            print(f"{name}: {us:.1f} us/image ({us / baseline:.2f}x the bundle), embedding {width * 8}-d", flush=True)


if __name__ == "__main__":
    main()
