"""Sinkhorn-Knopp equipartition of samples over prototypes (SwAV, Algorithm in Caron et al. 2020).

A pure function: the process group is looked up at call time, never from
global configuration, and a single process is simply a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes for a B x K matrix of prototype scores; each returned row sums to 1.

    The normalisation order is the official one: Q = exp(scores / eps)^T is
    divided by its total, then `iterations` times every prototype row is
    divided by its sum and by K, and every sample column by its sum and by
    B_total; finally Q is scaled by B_total so that each sample's codes sum to 1.
    Sums over samples are all-reduced when a process group is initialised, so
    R ranks give the codes of one rank holding the concatenated batch.

    Computed in fp32 whatever the autocast dtype. Before the exponential each
    prototype's scores are shifted by their maximum over all ranks: the shift
    is a per-row factor that the first row normalisation cancels exactly, and it
    keeps exp() from overflowing (official code: exp(1/0.01) = inf in fp32) and
    every row sum >= 1 (no 0/0) for small epsilon.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be B x K, got shape {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError("iterations must be >= 1 (the max shift cancels in the first row normalisation)")
    distributed = _group_active()
    world_size = dist.get_world_size() if distributed else 1
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.detach().float()
        row_max = scores.max(dim=0).values  # per prototype, K
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        q = torch.exp((scores - row_max) / epsilon).t()  # K x B
        num_prototypes = q.shape[0]
        b_total = q.shape[1] * world_size

        total = q.sum()
        if distributed:
            dist.all_reduce(total)
        q /= total

        tiny = torch.finfo(q.dtype).tiny
        for _ in range(iterations):
            row_sums = q.sum(dim=1, keepdim=True)
            if distributed:
                dist.all_reduce(row_sums)
            q /= row_sums
            q /= num_prototypes
            # A sample whose every score underflowed keeps zero codes instead of 0/0.
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
            q /= b_total
        q *= b_total
        return q.t()
