"""Per-rank FIFO of past projections, used to give Sinkhorn more samples with small batches."""

from __future__ import annotations

import torch


class EmbeddingQueue:
    """Shape (len(crops_for_assign), length_per_rank, dim), newest embeddings first.

    The queue is *used* only once full (its last row is non-zero) and then stays
    used; callers read it (`scores_with_queue`) before `push`ing the current batch.
    """

    def __init__(self, num_assign: int, length_per_rank: int, dim: int, device: torch.device | str = "cpu"):
        if length_per_rank <= 0:
            raise ValueError("queue length per rank must be positive")
        self.buffer = torch.zeros(num_assign, length_per_rank, dim, device=device)
        self.in_use = False

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def is_full(self, slot: int) -> bool:
        return bool(torch.any(self.buffer[slot, -1] != 0))

    @torch.no_grad()
    def scores_with_queue(self, slot: int, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """`scores` (B x K, fp32) with the queue's scores prepended once the queue is full."""
        if self.in_use or self.is_full(slot):
            self.in_use = True
            queued = self.buffer[slot] @ prototypes.detach().float().t()
            return torch.cat((queued, scores))
        return scores

    @torch.no_grad()
    def push(self, slot: int, embeddings: torch.Tensor) -> None:
        """Shift the queue by the batch size and write `embeddings` at the front."""
        bs = embeddings.shape[0]
        if bs > self.length:
            raise ValueError(f"batch of {bs} does not fit a queue of {self.length}")
        self.buffer[slot, bs:] = self.buffer[slot, :-bs].clone()
        self.buffer[slot, :bs] = embeddings.detach().float()

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.cpu(), "in_use": self.in_use}

    def load_state_dict(self, state: dict) -> None:
        buf = state["buffer"]
        if buf.shape != self.buffer.shape:
            raise ValueError(f"saved queue has shape {tuple(buf.shape)}, expected {tuple(self.buffer.shape)}")
        self.buffer.copy_(buf)
        self.in_use = bool(state["in_use"])
