"""Two gloo processes training in train mode must give what one process gives on the concatenated
batch, with each rank's BatchNorm normalising its own share.

What this covers and what it does not: PyTorch's SyncBatchNorm refuses CPU tensors (checked below),
so the trainer uses it only on CUDA, and on the CPU each rank's BatchNorm sees its own share of the
batch. These tests run that CPU path under DDP with gloo: the all-reduced Sinkhorn codes, the loss
averaged over ranks, DDP's gradient all-reduce, and per-rank BatchNorm statistics, all in train
mode. SyncBatchNorm itself (CUDA, NCCL) is not exercised by any test here.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port, tiny_config
from swav_train.loss import SwAVLoss
from swav_train.model import SwAVModel
from swav_train.optim import LARS
from swav_train.sinkhorn import sinkhorn_knopp
from swav_train.train import train_step

WORLD = 2
BS = 8  # per rank


def _inputs(cfg):
    g = torch.Generator().manual_seed(7)
    crops = [torch.randn(BS * WORLD, 3, s, s, generator=g) for n, s in zip(cfg.nmb_crops, cfg.size_crops)
             for _ in range(n)]
    scores = torch.nn.functional.normalize(torch.randn(BS * WORLD, 5, generator=g), dim=1)
    return crops, scores


def _model(cfg) -> SwAVModel:
    torch.manual_seed(3)
    return SwAVModel.from_config(cfg).train()


def _share(crops, rank):
    return [c[rank * BS:(rank + 1) * BS] for c in crops]


class _PerRankBatchNorm(nn.Module):
    """One process doing what WORLD ranks with plain BatchNorm do: each rank's share of the crops
    goes through the model on its own (so BatchNorm normalises over that share), and the outputs
    are laid out as the model lays out the concatenated batch (crop after crop)."""

    def __init__(self, model: SwAVModel):
        super().__init__()
        self.model = model
        self.prototypes = model.prototypes

    def normalize_prototypes(self) -> None:
        self.model.normalize_prototypes()

    def forward(self, crops):
        shares = [self.model(_share(crops, r)) for r in range(WORLD)]
        n = len(crops)

        def merged(i):
            return torch.cat([s[i].reshape(n, BS, -1) for s in shares], dim=1).reshape(n * WORLD * BS, -1)

        return merged(0), merged(1)


def _step(model, cfg, crops):
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)
    opt = LARS(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights, the grads stay readable
    loss, _ = train_step(model, loss_fn, opt, crops, iteration=10, freeze_prototypes_niters=0)
    return loss


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = tiny_config()
        crops, scores = _inputs(cfg)
        codes = sinkhorn_knopp(_share([scores], rank)[0], 0.05, 3)
        model = DistributedDataParallel(_model(cfg))
        loss = _step(model, cfg, _share(crops, rank))
        assert model.module.training
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        buffers = {n: b.clone() for n, b in model.module.named_buffers()}
        # Why the trainer converts to SyncBatchNorm only on CUDA: it refuses CPU input.
        sync_bn_error = None
        try:
            nn.SyncBatchNorm(4).train()(torch.randn(2, 4, 3, 3))
        except ValueError as e:
            sync_bn_error = str(e)
        torch.save({"codes": codes, "loss": loss, "grads": grads, "buffers": buffers, "sync_bn_error": sync_bn_error},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_ranks_in_train_mode_equal_one_process_on_concatenated_batch(ranks):
    cfg = tiny_config()
    crops, scores = _inputs(cfg)
    want_codes = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), want_codes, rtol=1e-5, atol=1e-6)

    one = _PerRankBatchNorm(_model(cfg))
    loss = _step(one, cfg, crops)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    names = [n for n, _ in one.model.named_parameters()]
    assert len(names) > 20
    for name, p in one.model.named_parameters():
        assert p.grad is not None, name
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    # The prototypes were unfrozen, so they took part.
    assert float(one.model.prototypes.weight.grad.abs().sum()) > 0


def test_each_rank_batchnorm_keeps_the_statistics_of_its_own_share(ranks):
    cfg = tiny_config()
    crops, _ = _inputs(cfg)
    for rank, got in enumerate(ranks):
        alone = _model(cfg)
        with torch.no_grad():
            alone(_share(crops, rank))
        stats = [n for n, _ in alone.named_buffers() if n.endswith("running_mean")]
        assert len(stats) > 10
        for name, want in alone.named_buffers():
            torch.testing.assert_close(got["buffers"][name], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    # Train mode really moved them, and differently on the two ranks (different shares).
    fresh = dict(_model(cfg).named_buffers())
    name = "backbone.bn1.running_mean"
    assert not torch.allclose(ranks[0]["buffers"][name], fresh[name])
    assert not torch.allclose(ranks[0]["buffers"][name], ranks[1]["buffers"][name])


def test_sync_batchnorm_refuses_cpu_tensors(ranks):
    # If a PyTorch release lifts this, the trainer can use SyncBatchNorm on the CPU too
    # (train.py converts only on CUDA) and these tests should cover it.
    for r in ranks:
        assert r["sync_bn_error"] is not None and "GPU" in r["sync_bn_error"], r["sync_bn_error"]
