"""Where a CPU training step's time goes, and what the batched tensor multi-crop and bf16 change.

For each configuration, three ways of training the same model on the same data (Fashion-MNIST, the
trainer's own `_loader` and step pieces) run in their own subprocess, alternately, --repeats times:
- `pil`:         the PIL multi-crop in DataLoader worker processes (num_workers as configured), fp32;
- `tensor`:      the batched multi-crop on uint8 tensors in the training process, fp32;
- `tensor-bf16`: the same under bf16 autocast (only where the CPU has native bf16).
Each prints images/s (wall) and images per CPU-second (the trainer's process plus its DataLoader
workers, from /proc), and the mean milliseconds per step spent getting the batch, in the forward
pass, in the loss (Sinkhorn and the swapped prediction), in the backward pass and in LARS.

    .venv/bin/python training/benchmarks/bench_step.py [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # the fashion-mnist preset before issue 13 (width 16, stride-1 stem)
    "w16-s1": dict(width=16, stem="small"),
    # the calibration run's shape (width 32, stride-2 stem)
    "w32-s2": dict(width=32, stem="small-stride2"),
}
MODES = ("pil", "tensor", "tensor-bf16")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(config: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from swav_train import distributed
    from swav_train.augment import MultiCrop
    from swav_train.config import preset
    from swav_train.data import training_dataset
    from swav_train.loss import SwAVLoss
    from swav_train.model import SwAVModel, to_channels_last
    from swav_train.optim import LARS
    from swav_train.train import _loader, resolve_precision

    torch.set_num_threads(threads)
    cfg = preset("fashion-mnist").replace(**CONFIGS[config], augment="pil" if mode == "pil" else "tensor",
                                          precision="bf16" if mode.endswith("bf16") else "fp32",
                                          freeze_prototypes_niters=0, queue_length=0)
    ctx = distributed.setup("cpu")
    torch.manual_seed(0)
    model = SwAVModel.from_config(cfg)
    to_channels_last(model, ctx.device)
    opt = LARS(model.parameters(), lr=0.1, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               trust_coefficient=cfg.trust_coefficient)
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)
    dtype = resolve_precision(cfg.precision, ctx.device)
    dataset, _ = training_dataset(cfg.dataset, "", cfg.fashion_mnist_dir, cfg.channels, MultiCrop(cfg))
    iters = len(dataset) // cfg.batch_size
    it = iter(_loader(cfg, dataset, ctx, 0, iters))
    phases = {k: 0.0 for k in ("data", "forward", "loss", "backward", "optimizer")}
    workers = []
    t0 = cpu0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            workers = [w.pid for w in getattr(it, "_workers", [])]
            phases = {k: 0.0 for k in phases}
            t0 = time.perf_counter()
            cpu0 = time.process_time() + sum(_cpu_seconds(p) for p in workers)
        a = time.perf_counter()
        crops = [c.contiguous(memory_format=torch.channels_last) for c in next(it)]
        b = time.perf_counter()
        model.normalize_prototypes()
        ctx_autocast = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with ctx_autocast:
            emb, scores = model(crops)
            c = time.perf_counter()
            loss, _ = loss_fn(scores, emb.detach(), cfg.batch_size)
        d = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        e = time.perf_counter()
        opt.step()
        f = time.perf_counter()
        for k, v in zip(phases, (b - a, c - b, d - c, e - d, f - e)):
            phases[k] += v
    wall = time.perf_counter() - t0
    cpu = time.process_time() + sum(_cpu_seconds(p) for p in workers) - cpu0
    images = steps * cfg.batch_size
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu,
            "ms": {k: 1000 * v / steps for k, v in phases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.warmup, args.threads)))
        return
    import torch

    from swav_train.train import cpu_has_native_bf16

    modes = [m for m in MODES if not m.endswith("bf16") or cpu_has_native_bf16()]
    print(f"torch {torch.__version__}, {args.threads} threads, native bf16: {cpu_has_native_bf16()}, "
          f"{args.steps} timed steps after {args.warmup}, batch 256, crops 2x28 + 4x16")
    for config in args.configs:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--child", config, mode, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup), "--threads", str(args.threads)],
                                     check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                runs[mode].append(res)
                print(f"  {config} run {r + 1} {mode:12s} {res['images_per_s']:7.1f} images/s "
                      f"{res['images_per_cpu_s']:7.1f} images per CPU-s", flush=True)
        base = statistics.median(x["images_per_s"] for x in runs["pil"])
        base_cpu = statistics.median(x["images_per_cpu_s"] for x in runs["pil"])
        print(f"{config}: {CONFIGS[config]}, medians of {args.repeats}")
        print(f"  {'mode':12s} {'img/s':>8s} {'img/CPU-s':>10s} {'x pil':>6s}   ms per step: "
              "data forward loss backward optimizer")
        for mode in modes:
            ips = statistics.median(x["images_per_s"] for x in runs[mode])
            cps = statistics.median(x["images_per_cpu_s"] for x in runs[mode])
            ms = {k: statistics.median(x["ms"][k] for x in runs[mode]) for k in runs[mode][0]["ms"]}
            print(f"  {mode:12s} {ips:8.1f} {cps:10.1f} {ips / base:5.2f}x   "
                  + " ".join(f"{ms[k]:.0f}" for k in ms) + f"   (CPU {cps / base_cpu:.2f}x)")


if __name__ == "__main__":
    main()
