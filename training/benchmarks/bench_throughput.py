"""Training throughput on CPU: swav_train against lightly's SwAV, and the fashion-mnist preset per width.

    nice python training/benchmarks/bench_throughput.py                 # both parts
    nice python training/benchmarks/bench_throughput.py --skip-widths   # only the lightly comparison

Part 1 (same work per step): the same backbone (our ResNet-18 trunk at --width, small stem, 1 channel),
the same head sizes, batch, crops (2x28 + 4x16 px multi-crop of Fashion-MNIST, made once with our
augmentation and fed to both from memory, so that only the training step is timed), the same
optimiser family (LARS: ours, lightly.utils.lars.LARS), prototypes unfrozen in both. lightly is
used as its documentation shows (SwaVProjectionHead, SwaVPrototypes, SwaVLoss, one model call
per view); swav_train runs its own `train_step` (crops of equal size share one backbone pass).
Each trainer runs in its own subprocess (so the peak RSS, ru_maxrss, is its own), alternately,
--repeats times; the median images/s is reported.

Part 2: the real `python -m swav_train train --preset fashion-mnist` loop (DataLoader with one
worker and the PIL multi-crop augmentation included) at several widths, images/s of the steps after
the first, read from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _batches(args) -> list[list]:
    import torch

    from swav_train import config
    from swav_train.augment import MultiCrop
    from swav_train.data import ArrayImageDataset, load_fashion_mnist

    cfg = config.preset("fashion-mnist")
    torch.manual_seed(0)
    images, _ = load_fashion_mnist(cfg.fashion_mnist_dir, "train")
    ds = ArrayImageDataset(images[: args.batch_size * args.distinct_batches], 1, MultiCrop(cfg))
    out = []
    for b in range(args.distinct_batches):
        items = [ds[b * args.batch_size + i] for i in range(args.batch_size)]
        out.append([torch.stack(c) for c in zip(*items)])
    return out


def _run_ours(args, batches) -> float:
    import torch

    from swav_train.loss import SwAVLoss
    from swav_train.model import SwAVModel, to_channels_last
    from swav_train.optim import LARS
    from swav_train.train import train_step

    torch.manual_seed(0)
    model = SwAVModel("resnet18", args.width, 1, True, args.hidden, 128, args.prototypes).train()
    if args.channels_last:  # what train.py does with its default channels_last=True
        to_channels_last(model, torch.device("cpu"))
        batches = [[c.contiguous(memory_format=torch.channels_last) for c in b] for b in batches]
    opt = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    loss_fn = SwAVLoss(total_crops=6, crops_for_assign=(0, 1))

    def step(i):
        train_step(model, loss_fn, opt, batches[i % len(batches)], iteration=i, freeze_prototypes_niters=0)

    return _time(step, args)


def _run_lightly(args, batches) -> float:
    import torch
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.utils.lars import LARS
    from torch import nn

    from swav_train.model import ResNetTrunk

    class LightlySwaV(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNetTrunk("resnet18", args.width, 1, True)
            self.projection_head = SwaVProjectionHead(self.backbone.out_dim, args.hidden, 128)
            self.prototypes = SwaVPrototypes(128, n_prototypes=args.prototypes)

        def forward(self, x):
            x = self.projection_head(self.backbone(x).flatten(start_dim=1))
            return self.prototypes(nn.functional.normalize(x, dim=1, p=2))

    torch.manual_seed(0)
    model = LightlySwaV().train()
    criterion = SwaVLoss()
    opt = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)

    def step(i):
        views = batches[i % len(batches)]
        model.prototypes.normalize()
        outs = [model(v) for v in views]
        loss = criterion(outs[:2], outs[2:])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, args)


def _time(step, args) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process)."""
    for i in range(args.warmup):
        step(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    n = args.steps * args.batch_size
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    batches = _batches(args)
    rate, cpu_rate = (_run_ours if args.child == "swav_train" else _run_lightly)(args, batches)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trainer": args.child, "images_per_s": rate, "images_per_cpu_s": cpu_rate,
                      "peak_rss_mib": peak_mib}))


def compare(args) -> None:
    results: dict[str, list[dict]] = {"swav_train": [], "lightly": []}
    common = ["--width", str(args.width), "--hidden", str(args.hidden), "--prototypes", str(args.prototypes),
              "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--distinct-batches", str(args.distinct_batches)]
    if not args.channels_last:
        common.append("--no-channels-last")
    for r in range(args.repeats):
        for trainer in ("swav_train", "lightly"):
            out = subprocess.run([sys.executable, __file__, "--child", trainer, *common], check=True,
                                 capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[trainer].append(res)
            print(f"  run {r + 1} {trainer:10s} {res['images_per_s']:7.1f} images/s (wall), "
                  f"{res['images_per_cpu_s']:7.1f} images per CPU-s, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    med = {t: statistics.median(x["images_per_s"] for x in v) for t, v in results.items()}
    cpu = {t: statistics.median(x["images_per_cpu_s"] for x in v) for t, v in results.items()}
    rss = {t: max(x["peak_rss_mib"] for x in v) for t, v in results.items()}
    print(f"config: resnet18 width {args.width} small stem, 1 channel, head {args.hidden}->128, K={args.prototypes}, "
          f"batch {args.batch_size}, crops 2x28 + 4x16, {args.threads} threads, {args.steps} timed steps "
          f"after {args.warmup}, swav_train channels_last={args.channels_last}")
    for t in ("swav_train", "lightly"):
        print(f"{t:10s} median {med[t]:7.1f} images/s (wall)  {cpu[t]:7.1f} images per CPU-s   "
              f"peak RSS {rss[t]:.0f} MiB")
    print(f"speed-up swav_train / lightly: {med['swav_train'] / med['lightly']:.2f}x wall, "
          f"{cpu['swav_train'] / cpu['lightly']:.2f}x CPU")


def widths(args) -> None:
    for w in args.widths:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "swav_train", "train", "--preset", "fashion-mnist", "--out", tmp,
                   "--width", str(w), "--epochs", "1", "--warmup-epochs", "0", "--max-images",
                   str(args.preset_batch * (args.preset_steps + 1)), "--batch-size", str(args.preset_batch),
                   "--log-every", "1", "--no-progress", "--no-evaluate", "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                raise SystemExit(f"width {w}: trainer failed")
            records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in records if r["kind"] == "train" and r["epoch"] == 0]
            rates = [s["step_images_per_s"] for s in steps[1:]]  # the first step includes start-up
            print(f"fashion-mnist preset, width {w:3d}: {statistics.mean(rates):6.1f} images/s "
                  f"(steps 2..{len(steps)} of epoch 1, batch {args.preset_batch}, wall {time.perf_counter() - t0:.0f} s)",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=("swav_train", "lightly"), help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--prototypes", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--distinct-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per trainer (1: robust timings on a shared machine)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="swav_train's default memory format (lightly's example has none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--skip-widths", action="store_true")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--preset-batch", type=int, default=256)
    p.add_argument("--preset-steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not args.skip_compare:
        compare(args)
    if not args.skip_widths:
        widths(args)


if __name__ == "__main__":
    main()
