"""Two gloo processes must give exactly what one process gives on the concatenated batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def _model(cfg):
    torch.manual_seed(3)
    model = SwAVModel.from_config(cfg)
    # Per-sample BatchNorm (running statistics) so that one process and two see the same
    # normalisation; SyncBatchNorm, which would make train-mode BN equal, needs CUDA.
    return model.eval()


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
        mine = slice(rank * BS, (rank + 1) * BS)
        codes = sinkhorn_knopp(scores[mine], 0.05, 3)
        model = DistributedDataParallel(_model(cfg))
        loss = _step(model, cfg, [c[mine] for c in crops])
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        torch.save({"codes": codes, "loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    cfg = tiny_config()
    crops, scores = _inputs(cfg)
    want_codes = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), want_codes, rtol=1e-5, atol=1e-6)

    model = _model(cfg)
    loss = _step(model, cfg, crops)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 20
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # The prototypes were unfrozen, so they took part.
    assert float(model.prototypes.weight.grad.abs().sum()) > 0
