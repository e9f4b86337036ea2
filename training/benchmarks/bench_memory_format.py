"""What each memory-format choice costs on the CPU (issue 20): training steps per CPU-second.

    nice python training/benchmarks/bench_memory_format.py [--repeats 3]

Choices, each timed in its own subprocess (a crash kills only that one and is reported with its
signal), alternately, --repeats times; medians of images per CPU-second of the process:

  all-cl     every layer in channels_last (the trainer before issue 20)
  cl         channels_last except the strided 1x1 convolutions over fewer than a multiple of 16
             channels, which stay contiguous (model.to_channels_last; the trainer's default)
  contiguous no channels_last (--no-channels-last)

Steps are the trainer's `train_step` (SwAV loss, LARS) on random crops, 1 torch thread.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time

# name -> (TrainConfig changes over the imagenet preset, batch)
CONFIGS = {
    "issue-64px-w8": (dict(width=8, stem="small", image_size=64, resize_size=64, size_crops=(64, 32),
                           nmb_prototypes=32, feat_dim=16), 16),
    "issue-224px-w8": (dict(width=8, stem="imagenet", image_size=224, resize_size=256, size_crops=(224, 96),
                            nmb_prototypes=32, feat_dim=16), 8),
    "64px-w16": (dict(width=16, stem="small", image_size=64, resize_size=64, size_crops=(64, 32),
                      nmb_prototypes=32, feat_dim=16), 16),
    "fashion-mnist-w8": (dict(width=8), 64),
}
MODES = ("all-cl", "cl", "contiguous")


def _config(name: str):
    from swav_train import config

    changes, batch = CONFIGS[name]
    base = config.preset("fashion-mnist") if name.startswith("fashion-mnist") else config.preset("imagenet")
    return base.replace(arch="resnet18", batch_size=batch, freeze_prototypes_niters=0, **changes)


def child(name: str, mode: str, warmup: int, steps: int) -> None:
    import torch

    from swav_train.loss import SwAVLoss
    from swav_train.model import SwAVModel, to_channels_last
    from swav_train.optim import LARS
    from swav_train.train import train_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _config(name)
    model = SwAVModel.from_config(cfg).train()
    if mode == "all-cl":
        model.to(memory_format=torch.channels_last)
    elif mode == "cl":
        to_channels_last(model, torch.device("cpu"))
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)
    opt = LARS(model.parameters(), lr=0.1, momentum=0.9)
    crops = [torch.rand(cfg.batch_size, cfg.channels, s, s) for n, s in zip(cfg.nmb_crops, cfg.size_crops)
             for _ in range(n)]
    if mode != "contiguous":
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    for i in range(warmup):
        train_step(model, loss_fn, opt, crops, i, 0)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        train_step(model, loss_fn, opt, crops, warmup + i, 0)
    n = steps * cfg.batch_size
    print(json.dumps({"cpu": n / (time.process_time() - c0), "wall": n / (time.perf_counter() - t0)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.warmup, args.steps)
        return
    for name in args.configs:
        cfg = _config(name)
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.nmb_crops, cfg.size_crops))
        print(f"{name}: resnet18 width {cfg.width}, {cfg.channels} ch, {cfg.stem if cfg.stem != 'auto' else ('small' if cfg.small_stem else 'imagenet')} "
              f"stem, crops {crops}, batch {cfg.batch_size}", flush=True)
        results: dict[str, list] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                proc = subprocess.run([sys.executable, __file__, "--child", name, mode, "--warmup", str(args.warmup),
                                       "--steps", str(args.steps)], capture_output=True, text=True)
                if proc.returncode < 0:
                    results[mode].append(f"crashed ({signal.Signals(-proc.returncode).name})")
                elif proc.returncode:
                    raise SystemExit(proc.stderr[-2000:])
                else:
                    results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        medians = {m: statistics.median(r["cpu"] for r in v) for m, v in results.items()
                   if not any(isinstance(r, str) for r in v)}
        for mode in MODES:
            runs = results[mode]
            if mode not in medians:
                crashes = [r for r in runs if isinstance(r, str)]
                print(f"  {mode:10s} {len(crashes)}/{len(runs)} runs {crashes[0]}", flush=True)
                continue
            rel = f", {medians[mode] / medians['cl']:.2f}x of cl" if "cl" in medians and mode != "cl" else ""
            print(f"  {mode:10s} {medians[mode]:7.1f} images per CPU-s (median; runs "
                  f"{', '.join(format(r['cpu'], '.1f') for r in runs)}){rel}", flush=True)

if __name__ == "__main__":
    main()
