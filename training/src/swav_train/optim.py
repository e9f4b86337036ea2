"""LARS (SGD + LARC adaptive learning rate) and the learning-rate schedule, as pure pieces."""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-parameter step is scaled as NVIDIA apex's LARC
    with clip=False (what the paper's code wraps around SGD):

        local_lr = trust * ||w|| / (||g|| + weight_decay * ||w|| + eps)
        g <- (g + weight_decay * w) * local_lr          (only when ||w|| and ||g|| are non-zero)
        buf <- momentum * buf + g;  w <- w - lr * buf

    As in LARC, weight decay is not applied to a parameter whose weight or
    gradient norm is zero. Parameters whose grad is None are skipped (that is
    how frozen prototypes stay put, momentum buffer included).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0 and trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, trust, eps = group["weight_decay"], group["momentum"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                param_norm = torch.linalg.vector_norm(p)
                grad_norm = torch.linalg.vector_norm(g)
                if param_norm != 0 and grad_norm != 0:
                    local_lr = trust * param_norm / (grad_norm + param_norm * wd + eps)
                    g = (g + wd * p) * local_lr
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = g.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(mom).add_(g)
                    g = buf
                p.add_(g, alpha=-group["lr"])
        return loss


def learning_rate(step: int, iters_per_epoch: int, epochs: int, warmup_epochs: int,
                  base_lr: float, final_lr: float, start_warmup: float = 0.0) -> float:
    """The paper's schedule at iteration `step`: np.linspace(start_warmup, base_lr,
    warmup_iters) during warmup, then cosine from base_lr to final_lr."""
    warmup_iters = iters_per_epoch * warmup_epochs
    if step < warmup_iters:
        if warmup_iters == 1:
            return start_warmup
        return start_warmup + (base_lr - start_warmup) * step / (warmup_iters - 1)
    t = step - warmup_iters
    cosine_iters = iters_per_epoch * (epochs - warmup_epochs)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / cosine_iters))
