"""The crash guard: one trial step in a child process before the first training step.

Native code (oneDNN, cuDNN, a BLAS) can die by a signal, or corrupt the heap, for particular layer
shapes on particular processors (issue 20), and no Python code can catch that. So before training,
a child process builds the configured model, puts it in the configured memory format on the
configured device, and runs one forward and backward pass of the SwAV loss on random crops of the
configured sizes and batch. If the child dies by a signal with channels_last on, the trial is run
again in the contiguous format; when that one lives, training goes on without channels_last and
says so. When no format lives, the run stops with `NativeCrashError` before any step.

    python -m swav_train.guard CONFIG.json --device cpu   # the child; exits 0 when the step ran
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from swav_train.config import TrainConfig

log = logging.getLogger(__name__)


class NativeCrashError(RuntimeError):
    """The trial step died by a signal in every memory format tried; training would crash too."""


class TrialStepError(RuntimeError):
    """The trial step failed with an ordinary error (its output is in the message)."""


@dataclass(frozen=True)
class Trial:
    returncode: int
    output: str  # the child's stderr and stdout, last lines

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    def describe(self) -> str:
        if self.signal is not None:
            return f"died by signal {self.signal} ({signal_name(self.signal)})"
        return f"exited with status {self.returncode}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def child_command(config_path: Path, device: str) -> list[str]:
    """The trial's command line (the tests swap in one that kills itself)."""
    return [sys.executable, "-m", "swav_train.guard", str(config_path), "--device", device]


def run_trial(cfg: TrainConfig, device: str) -> Trial:
    with tempfile.TemporaryDirectory(prefix="swav-guard-") as tmp:
        path = Path(tmp) / "config.json"
        cfg.save(path)
        # The child must not be a torchrun worker: it trains alone, without a process group.
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(child_command(path, device), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", env=env)
    tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-20:])
    return Trial(proc.returncode, tail)


def _shape(cfg: TrainConfig) -> str:
    crops = " + ".join(f"{n}x{s} px" for n, s in zip(cfg.nmb_crops, cfg.size_crops))
    fmt = "channels_last" if cfg.channels_last else "contiguous"
    return (f"{cfg.arch} width {cfg.width}, {cfg.channels} channel(s), {cfg.stem if cfg.stem != 'auto' else ('small' if cfg.small_stem else 'imagenet')} "
            f"stem, crops {crops}, batch {cfg.batch_size}, {fmt}")


def check(cfg: TrainConfig, device: str) -> TrainConfig:
    """Run the trial step; returns the config to train with (channels_last switched off when only
    the contiguous format survives). Raises NativeCrashError or TrialStepError."""
    log.info("crash guard: one trial step in a child process (%s, on %s)", _shape(cfg), device)
    trial = run_trial(cfg, device)
    if trial.returncode == 0:
        return cfg
    if trial.signal is None:
        raise TrialStepError(f"the trial step before training ({_shape(cfg)}, on {device}) {trial.describe()}:\n"
                             f"{trial.output}")
    if cfg.channels_last:
        fallback = cfg.replace(channels_last=False)
        retry = run_trial(fallback, device)
        if retry.returncode == 0:
            log.warning("the trial step before training (%s, on %s) %s: a native crash inside PyTorch on this "
                        "machine. The same step in the contiguous memory format ran, so this run trains with "
                        "channels_last off, as with --no-channels-last (slower on the CPU, same results). "
                        "Pass --no-channels-last to skip the failing trial next time.",
                        _shape(cfg), device, trial.describe())
            return fallback
        raise NativeCrashError(
            f"the trial step before training {trial.describe()} with channels_last ({_shape(cfg)}, on {device}) "
            f"and {retry.describe()} with --no-channels-last: PyTorch crashes natively on this configuration on "
            "this machine. Try another --width, --arch or --size-crops, or another PyTorch build. Last output:\n"
            f"{retry.output}")
    raise NativeCrashError(
        f"the trial step before training ({_shape(cfg)}, on {device}) {trial.describe()}: PyTorch crashes natively "
        "on this configuration on this machine. Try another --width, --arch or --size-crops, or another PyTorch "
        f"build. Last output:\n{trial.output}")


def trial_step(cfg: TrainConfig, device: str) -> None:
    """One forward and backward pass, as the training loop runs it, on random crops."""
    import torch

    from swav_train.loss import SwAVLoss
    from swav_train.model import SwAVModel, to_channels_last
    from swav_train.train import resolve_precision

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device)
    model = SwAVModel.from_config(cfg).to(dev).train()
    if cfg.channels_last:
        to_channels_last(model, dev)
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)
    crops = [torch.rand(cfg.batch_size, cfg.channels, size, size, device=dev)
             for n, size in zip(cfg.nmb_crops, cfg.size_crops) for _ in range(n)]
    if cfg.channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    dtype = resolve_precision(cfg.precision, dev)
    model.normalize_prototypes()
    with torch.autocast(dev.type, dtype=dtype) if dtype else torch.autocast(dev.type, enabled=False):
        embedding, scores = model(crops)
        loss, _ = loss_fn(scores, embedding.detach(), cfg.batch_size, None, model.prototypes.weight)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> int:
    from swav_train import config as config_mod

    parser = argparse.ArgumentParser(prog="python -m swav_train.guard",
                                     description="The crash guard's trial step (run by the trainer).")
    parser.add_argument("config", help="a config.json")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    args = parser.parse_args(argv)
    trial_step(config_mod.load(args.config), args.device)
    return 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # the parent shows where the child died
    sys.exit(main())
