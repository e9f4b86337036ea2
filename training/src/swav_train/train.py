"""The training loop: autocast, prototype normalisation and freezing, NaN guard,
checkpoints and resume, progress and metrics."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from swav_train import checkpoint, distributed, guard
from swav_train.augment import MultiCrop
from swav_train.batch_augment import BatchCropLoader
from swav_train.bundle_model import initial_weights
from swav_train.config import ConfigError, TrainConfig
from swav_train.data import ArrayImageDataset, DataError, ImageFolderDataset, training_dataset
from swav_train.distributed import DistContext
from swav_train.loss import LossStats, SwAVLoss
from swav_train.model import SwAVModel, to_channels_last
from swav_train.optim import LARS, learning_rate
from swav_train.queue import EmbeddingQueue

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Batches of crops a bundle's BatchNorm statistics are measured on when a run starts from it.
_CALIBRATION_BATCHES = 8
# Fields that may change between a run and its resumption without changing what is learned
# (embedding_layer only picks what the export writes).
RESUMABLE_CHANGES = {"num_workers", "progress", "log_every", "threads", "channels_last", "crash_guard", "evaluate", "eval_train_size",
                     "eval_test_size", "eval_train_dir", "eval_test_dir", "name", "description", "fashion_mnist_dir",
                     "data_dir", "embedding_layer"}


PROBE_STEPS = 20  # steps a --time-budget run times before it fixes its length


@dataclass
class Schedule:
    """The learning-rate schedule: over cfg.epochs, over cfg.steps, or over the steps that fit in
    cfg.time_budget_min."""

    cfg: TrainConfig
    iters_per_epoch: int
    total_steps: int = 0
    warmup_steps: int = 0
    fixed: bool = True

    @classmethod
    def of(cls, cfg: TrainConfig, iters_per_epoch: int) -> Schedule:
        s = cls(cfg, iters_per_epoch, fixed=not cfg.time_budget_min)
        s._set_total(cfg.steps or cfg.epochs * iters_per_epoch)
        return s

    def _set_total(self, total: int) -> None:
        self.total_steps = max(1, total)
        self.warmup_steps = round(self.total_steps * self.cfg.warmup_epochs / self.cfg.epochs)

    def lr(self, step: int) -> float:
        # Steps as epochs of one iteration: the same warmup-then-cosine rule as the paper's.
        return learning_rate(step, 1, self.total_steps, self.warmup_steps, self.cfg.base_lr, self.cfg.final_lr,
                             self.cfg.start_warmup)

    def observe(self, step: int, elapsed_s: float, device: torch.device) -> None:
        """Under a time budget, fix the run's length once PROBE_STEPS steps have been timed; every
        rank takes the shortest estimate, so all stop at the same step."""
        if self.fixed or step + 1 < PROBE_STEPS:
            return
        fit = int(self.cfg.time_budget_min * 60 * (step + 1) / max(elapsed_s, 1e-9))
        fit = -distributed.all_reduce_max(-max(fit, step + 1), device)
        self._set_total(fit)
        self.fixed = True
        log.info("time budget %.1f min: %d steps (%.2f epochs) at the measured speed", self.cfg.time_budget_min,
                 self.total_steps, self.total_steps / self.iters_per_epoch)

    def epochs(self) -> int:
        """Epochs the run spans, the last one possibly partial."""
        return -(-self.total_steps // self.iters_per_epoch)

    def done(self, step: int) -> bool:
        return self.fixed and step + 1 >= self.total_steps


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    losses: list[float] = field(default_factory=list)  # per iteration, this process's run only
    bundle_dir: Path | None = None
    evaluation: dict | None = None
    started: float = 0.0  # perf_counter at the first step of this process's run


# ---- pieces usable on their own (tests drive them directly) ---------------

def unwrap(model: nn.Module) -> SwAVModel:
    return cast(SwAVModel, model.module if isinstance(model, DistributedDataParallel) else model)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cuda":
        if precision == "bf16" and cpu_has_native_bf16():
            return torch.bfloat16
        why = "this CPU has no native bf16 (AVX512-BF16 or AMX)" if precision == "bf16" else "it needs a CUDA device"
        raise ConfigError(f"precision={precision} cannot run here: {why}; use fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def train_step(model: nn.Module, loss_fn: SwAVLoss, optimizer: torch.optim.Optimizer, crops: list[torch.Tensor],
               iteration: int, freeze_prototypes_niters: int, queue: EmbeddingQueue | None = None,
               autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               ) -> tuple[torch.Tensor, LossStats]:
    """One SwAV step; returns the loss averaged over ranks (detached) and diagnostics.

    Gradients stay on the parameters after the step (the tests read them)."""
    core = unwrap(model)
    core.normalize_prototypes()
    bs = crops[0].shape[0]
    device_type = crops[0].device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        embedding, scores = model(crops)
        loss, stats = loss_fn(scores, embedding.detach(), bs, queue, core.prototypes.weight)
    mean_loss = distributed.all_reduce_mean(loss)
    check_finite(mean_loss, iteration)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if iteration < freeze_prototypes_niters:
        # After backward, so DDP's gradient all-reduce has happened: dropping the
        # grads leaves every rank's prototypes untouched by the optimiser.
        for p in core.prototypes.parameters():
            p.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return mean_loss, stats


def check_finite(loss: torch.Tensor, iteration: int) -> None:
    """The one NaN guard: every rank sees the same all-reduced value, so all stop together."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss is {loss.item()} at iteration {iteration}; stopping. Lower --base-lr, use "
            "--precision fp32, or check the data (a constant or corrupt batch)")


def collapse_warning(cfg: TrainConfig, mean_loss: float, mean_used: float, batch_size: int) -> str | None:
    """A warning text when the codes look collapsed, else None."""
    ln_k = math.log(cfg.nmb_prototypes)
    few = max(2.0, 0.1 * min(cfg.nmb_prototypes, batch_size))
    reasons = []
    if mean_loss > 0.98 * ln_k:
        reasons.append(f"loss {mean_loss:.4f} is stuck near ln K = {ln_k:.4f}")
    if cfg.nmb_prototypes > 1 and mean_used < few:
        reasons.append(f"only {mean_used:.1f} prototypes win in a batch on average")
    if not reasons:
        return None
    return ("codes may have collapsed: " + "; ".join(reasons) + ". Remedies: use a queue "
            "(--queue-length, e.g. 3840, and an earlier --epoch-queue-starts), freeze the prototypes longer "
            "(--freeze-prototypes-niters), lower --epsilon (e.g. 0.03), or use at least --feat-dim prototypes "
            "(--nmb-prototypes)")


class RunLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, append: bool):
        self.enabled = enabled
        self.jsonl: TextIO | None = None
        self.writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run continues the file; a fresh one must not mix with an old run's lines.
            self.jsonl = open(run_dir / "metrics.jsonl", "a" if append else "w")  # noqa: SIM115 (closed by close())
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any], step: int) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.writer.close()
            self.jsonl = None


# ---- the run --------------------------------------------------------------

def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loader(cfg: TrainConfig, dataset, ctx: DistContext, epoch: int, iters_per_epoch: int):
    # The data order and the augmentation seeds derive from (seed, epoch), so a resumed run
    # sees exactly the batches an uninterrupted one would.
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + ctx.rank)
    sampler: DistributedSampler | None = None
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    if cfg.tensor_augment:
        order = list(sampler) if sampler is not None else torch.randperm(len(dataset), generator=gen)
        return BatchCropLoader(_image_tensor(dataset), order, cfg, epoch, ctx.rank, iters_per_epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=gen, num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda",
                      drop_last=True, collate_fn=_collate_crops)


def _image_tensor(dataset) -> torch.Tensor:
    """The in-memory images of an array data set as one uint8 tensor (shared, not copied)."""
    if not isinstance(dataset, ArrayImageDataset):
        raise ConfigError("augment=tensor needs a data set held in memory (dataset=fashion-mnist)")
    return torch.from_numpy(np.array(dataset.images))  # a writable copy: IDX arrays are read-only views


def _collate_crops(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(crops) for crops in zip(*batch)]


def _check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    # A field added since the checkpoint was written counts as its default.
    defaults = TrainConfig().to_dict()
    diffs = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the run was started with a different config "
            f"({', '.join(f'{k}: {saved.get(k)!r} -> {cfg.to_dict()[k]!r}' for k in diffs)}); "
            "use the same settings or a new --out directory")


def _check_eval_data(cfg: TrainConfig) -> None:
    """Fail before training, not after it, when the labelled evaluation set is missing or unusable."""
    from swav_train.evaluate import EvalSet

    eval_set = EvalSet.of(cfg.to_dict())
    try:
        eval_set.check()
    except DataError as e:
        fix = "check --eval-train-dir and --eval-test-dir" if eval_set.uses_folders else "pass --fashion-mnist-dir DIR"
        raise DataError(f"{e}; the end-of-training evaluation needs it ({fix}, or --no-evaluate)") from None


def _crash_guard(cfg: TrainConfig, ctx: DistContext) -> TrainConfig:
    """The config to train with, after the trial step of `guard.check` on every rank; all ranks
    agree on the memory format, and all stop when one cannot train."""
    if not cfg.crash_guard:
        return cfg
    outcome, error = 0, None
    try:
        checked = guard.check(cfg, str(ctx.device))
        outcome = 0 if checked == cfg else 1
    except (guard.NativeCrashError, guard.TrialStepError) as e:
        outcome, error = 2, e
    outcome = distributed.all_reduce_max(outcome, ctx.device)
    if outcome == 2:
        raise error or guard.NativeCrashError(
            "the trial step before training failed on another rank; its output says why")
    return cfg.replace(channels_last=False) if outcome == 1 else cfg


def _make_queue(cfg: TrainConfig, ctx: DistContext) -> EmbeddingQueue | None:
    length = cfg.effective_queue_length(ctx.world_size) // ctx.world_size
    if length <= 0:
        return None
    return EmbeddingQueue(len(cfg.crops_for_assign), length, cfg.feat_dim, ctx.device)


def train(cfg: TrainConfig, run_dir: str | Path, resume: str | Path | bool = True,
          stop_after_epoch: int | None = None, finish: bool = True) -> TrainResult:
    """Train (resuming from `resume`, or from RUN_DIR/checkpoint.pt when True and it
    exists); when all epochs are done and `finish`, evaluate and write RUN_DIR/bundle.
    `stop_after_epoch` ends the run early after that many epochs (for interruption tests)."""
    ctx = distributed.setup(cfg.device)
    run_dir = Path(run_dir)
    try:
        return _train(cfg, run_dir, ctx, resume, stop_after_epoch, finish)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, run_dir: Path, ctx: DistContext, resume, stop_after_epoch, finish) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(resume) if isinstance(resume, (str, Path)) else run_dir / CHECKPOINT
    state = None
    if isinstance(resume, (str, Path)) or (resume and ckpt_path.exists()):
        state = checkpoint.load(ckpt_path, required=("epoch", "model", "optimizer", "config"))
        _check_resume_config(state["config"], cfg, ckpt_path)
        if cfg.time_budget_min:
            raise ConfigError(f"cannot resume from {ckpt_path}: a --time-budget-min run is not resumable "
                              "(its length depends on the speed it measured); use a new --out directory")
    if ctx.is_main:
        cfg.save(run_dir / "config.json")

    _seed(cfg.seed)  # identical model initialisation on every rank
    model = SwAVModel.from_config(cfg)
    _seed(cfg.seed + ctx.rank)
    if cfg.evaluate and finish:
        _check_eval_data(cfg)
    if cfg.nmb_prototypes < cfg.feat_dim and ctx.is_main:
        log.warning("nmb_prototypes=%d < feat_dim=%d: projections orthogonal to every prototype give uniform "
                    "codes, a collapse SwAV tends to fall into; use at least feat_dim prototypes",
                    cfg.nmb_prototypes, cfg.feat_dim)
    dataset, data_info = training_dataset(cfg.dataset, cfg.data_dir, cfg.fashion_mnist_dir, cfg.channels,
                                          MultiCrop(cfg), cfg.max_images)
    iters_per_epoch = len(dataset) // (cfg.batch_size * ctx.world_size)
    if iters_per_epoch == 0:
        raise DataError(f"{len(dataset)} training images are fewer than one batch "
                        f"({cfg.batch_size} x {ctx.world_size} rank(s)); lower --batch-size")

    guarded = _crash_guard(cfg, ctx)
    if guarded != cfg:
        cfg = guarded
        if ctx.is_main:
            cfg.save(run_dir / "config.json")
    if cfg.init_from and state is None:
        # A bundle's BatchNorms are recalibrated on the first crops of epoch 0; under DDP each rank's
        # differ, and DistributedDataParallel starts every rank from rank 0's.
        def calibration():
            return itertools.islice(iter(_loader(cfg, dataset, ctx, 0, iters_per_epoch)), _CALIBRATION_BATCHES)

        model.load_state_dict(initial_weights(cfg.init_from, cfg, calibration))
        if ctx.is_main:
            print(f"weights from {cfg.init_from}", flush=True)
    if ctx.distributed and cfg.sync_bn and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if cfg.channels_last:
        kept = to_channels_last(model, ctx.device)
        if kept and ctx.is_main:
            log.info("channels_last, except %s (kept contiguous: oneDNN's CPU kernel corrupts memory there)",
                     ", ".join(kept))
    optimizer = LARS(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     trust_coefficient=cfg.trust_coefficient)
    autocast_dtype = resolve_precision(cfg.precision, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)

    start_epoch, queue = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        rank_path = ckpt_path.parent / f"rank{ctx.rank}.pt"
        rank_state = checkpoint.load(rank_path, required=("epoch", "rng", "queue")) if rank_path.exists() else None
        if rank_state is not None and rank_state["epoch"] == start_epoch:
            checkpoint.set_rng_state(rank_state["rng"])
            if rank_state["queue"] is not None:
                queue = _make_queue(cfg, ctx)
                if queue is None:
                    raise checkpoint.CheckpointError(f"{rank_path} holds a queue, but the config has none")
                queue.load_state_dict(rank_state["queue"])
        else:
            log.warning("no matching per-rank state for rank %d; RNG and queue start afresh", ctx.rank)
        if ctx.is_main:
            print(f"resuming from {ckpt_path} at epoch {start_epoch}", flush=True)

    ddp_model: nn.Module = model
    if ctx.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)

    result = TrainResult(run_dir=run_dir, epochs_done=start_epoch)
    run = RunState(cfg=cfg, ctx=ctx, model=ddp_model, loss_fn=loss_fn, optimizer=optimizer, dataset=dataset,
                   iters_per_epoch=iters_per_epoch, autocast_dtype=autocast_dtype, scaler=scaler,
                   schedule=Schedule.of(cfg, iters_per_epoch),
                   runlog=RunLog(run_dir, ctx.is_main, append=state is not None), result=result, queue=queue)
    # A run of a set number of steps ends when they are done, whatever the number of epochs that takes.
    bound = 2**31 if cfg.time_budget_min else run.schedule.epochs()
    last_epoch = bound if stop_after_epoch is None else min(bound, stop_after_epoch)
    budget_done = False
    try:
        for epoch in range(start_epoch, last_epoch):
            if run.queue is None and cfg.queue_length > 0 and epoch >= cfg.epoch_queue_starts:
                run.queue = _make_queue(cfg, ctx)
            budget_done = _run_epoch(run, epoch)
            result.epochs_done = epoch + 1
            _save(cfg, ctx, run_dir, model, optimizer, scaler, run.queue, epoch + 1)
            if budget_done:
                break
    finally:
        run.runlog.close()

    # Other ranks do not wait for rank 0's evaluation and export: a long barrier would hit the
    # process group's timeout, and nothing after this point is collective.
    if finish and (result.epochs_done == bound or budget_done) and ctx.is_main:
        _finish(cfg, run_dir, model, dataset, data_info, result)
    return result


@dataclass
class RunState:
    """What every epoch of a run works with: set up once by `_train`, then read by `_run_epoch`,
    which appends to `result`; `queue` appears at `epoch_queue_starts`."""

    cfg: TrainConfig
    ctx: DistContext
    model: nn.Module  # the DDP wrapper when distributed
    loss_fn: SwAVLoss
    optimizer: torch.optim.Optimizer
    dataset: Dataset
    iters_per_epoch: int
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    schedule: Schedule
    runlog: RunLog
    result: TrainResult
    queue: EmbeddingQueue | None = None


def _run_epoch(run: RunState, epoch: int) -> bool:
    """One epoch (or, under a time budget, until the budget's last step); True when that came first."""
    cfg, ctx, iters_per_epoch, schedule, result = run.cfg, run.ctx, run.iters_per_epoch, run.schedule, run.result
    run.model.train()
    loader = _loader(cfg, run.dataset, ctx, epoch, iters_per_epoch)
    images_per_step = cfg.batch_size * ctx.world_size
    bar = tqdm(loader, total=iters_per_epoch, desc=f"epoch {epoch + 1}/{schedule.epochs()}", unit="it",
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)
    losses, used = [], []
    rate = None
    t_last = time.perf_counter()
    if not result.started:
        result.started = t_last
    budget_done = False
    for it, crops in enumerate(bar):
        step = epoch * iters_per_epoch + it
        lr = schedule.lr(step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        crops = [c.to(ctx.device, non_blocking=True) for c in crops]
        if cfg.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        loss, stats = train_step(run.model, run.loss_fn, run.optimizer, crops, step, cfg.freeze_prototypes_niters,
                                 run.queue, run.autocast_dtype, run.scaler)
        loss_value = loss.item()
        now = time.perf_counter()
        inst = images_per_step / max(now - t_last, 1e-9)
        t_last = now
        rate = inst if rate is None else 0.9 * rate + 0.1 * inst
        losses.append(loss_value)
        used.append(stats.prototypes_used)
        schedule.observe(step, now - result.started, ctx.device)
        remaining = (schedule.total_steps - step - 1) * images_per_step / max(rate, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}",
                        run_eta=tqdm.format_interval(remaining))
        budget_done = schedule.done(step)
        if it % cfg.log_every == 0 or it == iters_per_epoch - 1 or budget_done:
            run.runlog.write({"kind": "train", "epoch": epoch, "step": step, "loss": loss_value, "lr": lr,
                              "images_per_s": rate, "step_images_per_s": inst,
                              "prototypes_used": stats.prototypes_used, "queue_used": stats.queue_used}, step)
        if budget_done:
            break
    result.losses.extend(losses)
    mean_loss = float(np.mean(losses))
    mean_used = float(np.mean(used))
    run.runlog.write({"kind": "epoch", "epoch": epoch, "step": epoch * iters_per_epoch + len(losses) - 1,
                      "loss": mean_loss, "prototypes_used": mean_used, "images_per_s": rate}, epoch)
    if ctx.is_main:
        print(f"epoch {epoch + 1}/{schedule.epochs()}: loss {mean_loss:.4f}, {rate:.1f} images/s", flush=True)
        if (epoch + 1) * iters_per_epoch > cfg.freeze_prototypes_niters:
            warning = collapse_warning(cfg, mean_loss, mean_used, cfg.batch_size)
            if warning:
                log.warning(warning)
    return budget_done


def _save(cfg, ctx, run_dir: Path, model: SwAVModel, optimizer, scaler, queue, epochs_done: int) -> None:
    # Per-rank state (queue, RNG) first: the main checkpoint names the epoch it belongs to.
    checkpoint.atomic_save({"epoch": epochs_done, "rng": checkpoint.rng_state(),
                            "queue": queue.state_dict() if queue is not None else None},
                           run_dir / f"rank{ctx.rank}.pt")
    distributed.barrier()
    if ctx.is_main:
        checkpoint.atomic_save({
            "epoch": epochs_done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "config": cfg.to_dict(),
        }, run_dir / CHECKPOINT)
    distributed.barrier()


def _golden_inputs(dataset, workdir: Path, count: int = 4) -> list[Path]:
    """A few training images as files, for the bundle's golden parity cases."""
    if isinstance(dataset, ImageFolderDataset):
        return list(dataset.paths[:count])
    paths = []
    for i in range(min(count, len(dataset))):
        path = workdir / f"train_{i}.png"
        dataset.load(i).save(path)
        paths.append(path)
    return paths


def _finish(cfg: TrainConfig, run_dir: Path, model: SwAVModel, dataset, data_info: dict,
            result: TrainResult) -> None:
    from swav_train import evaluate, export

    # A fresh CPU copy: the trained one may hold SyncBatchNorm layers or channels_last weights.
    trained = model.state_dict()
    model = SwAVModel.from_config(cfg)
    model.load_state_dict({k: v.detach().cpu().contiguous() for k, v in trained.items()})
    model.eval()
    # The bundle first: an evaluation that fails (a missing labelled set, a bad image) must not
    # cost the trained model. Its manifest gets the evaluation once there is one.
    with tempfile.TemporaryDirectory() as tmp:
        golden = _golden_inputs(dataset, Path(tmp))
        result.bundle_dir = export.export_bundle(model, cfg, run_dir / "bundle", dataset=data_info,
                                                 golden_files=golden)
    print(f"bundle written to {result.bundle_dir}", flush=True)
    if not cfg.evaluate:
        return
    try:
        evaluation = evaluate.evaluate_torch(model, cfg, train_size=cfg.eval_train_size, test_size=cfg.eval_test_size)
    except Exception:
        log.error("the evaluation failed; the bundle at %s is kept without one (python -m swav_train eval %s "
                  "evaluates it later)", result.bundle_dir, result.bundle_dir)
        raise
    (run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    export.record_evaluation(result.bundle_dir, evaluation)
    result.evaluation = evaluation
    print("evaluation: " + evaluate.summary(evaluation), flush=True)
