"""The swapped-prediction loss of SwAV."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swav_train.queue import EmbeddingQueue
from swav_train.sinkhorn import sinkhorn_knopp


@dataclass
class LossStats:
    """Diagnostics of one step, for collapse warnings."""

    prototypes_used: int  # most distinct argmax prototypes in one assignment crop of the batch
    queue_used: bool


class SwAVLoss(nn.Module):
    """Each crop in `crops_for_assign` gets codes (Sinkhorn, no gradient); every
    other crop predicts them through softmax(scores / T). Averaged over the
    other crops, then over the assignment crops, as in the paper."""

    def __init__(self, total_crops: int, crops_for_assign: tuple[int, ...] = (0, 1), temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3):
        super().__init__()
        self.total_crops = total_crops
        self.crops_for_assign = tuple(crops_for_assign)
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations

    def forward(self, scores: torch.Tensor, embeddings: torch.Tensor, batch_size: int,
                queue: EmbeddingQueue | None = None,
                prototypes: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
        """`scores`: (total_crops * bs) x K, crops stacked in order; `embeddings`:
        the matching normalised projections (only read for the queue);
        `prototypes`: the K x d prototype weight (needed with a queue)."""
        bs = batch_size
        if scores.shape[0] != self.total_crops * bs:
            raise ValueError(f"expected {self.total_crops} crops of {bs} rows, got {scores.shape[0]} rows")
        loss = scores.new_zeros((), dtype=torch.float32)
        used = 0
        for slot, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = scores[bs * crop_id: bs * (crop_id + 1)].detach().float()
                used = max(used, int(out.argmax(dim=1).unique().numel()))
                if queue is not None:
                    if prototypes is None:
                        raise ValueError("the queue needs the prototype weight")
                    out = queue.scores_with_queue(slot, out, prototypes)
                    queue.push(slot, embeddings[bs * crop_id: bs * (crop_id + 1)])
                q = sinkhorn_knopp(out, self.epsilon, self.sinkhorn_iterations)[-bs:]
            subloss = loss.new_zeros(())
            for v in range(self.total_crops):
                if v == crop_id:
                    continue
                x = scores[bs * v: bs * (v + 1)].float() / self.temperature
                subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss = loss + subloss / (self.total_crops - 1)
        loss = loss / len(self.crops_for_assign)
        return loss, LossStats(prototypes_used=used, queue_used=queue is not None and queue.in_use)
