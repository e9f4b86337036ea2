"""Checkpoints in the released layouts with random weights: no real checkpoint can be downloaded
where the tests and benchmarks run, and the layout, not the values, is what an import depends on."""

from __future__ import annotations

import torch
from torch import nn

from swav_train.model import ResNetTrunk


def randomised(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The module's state_dict with random BatchNorm statistics and affine terms and biases, so that
    parity checks see every parameter matter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", ".bias")):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif v.is_floating_point() and v.dim() == 1:
            v = torch.rand(v.shape, generator=g) + 0.5
        out[k] = v
    return out


def official_state(width: int = 64, widen: int = 1, hidden: int = 2048, feat: int = 128, k: int = 3000,
                   head: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official release's layout (facebookresearch/swav src/resnet50.py): a torchvision-named
    ResNet-50 trunk whose stem and stages are `width` wide and whose bottlenecks are `widen` times
    wider inside (torchvision's width_per_group = 64 * widen), projection_head.{0,1,3} and
    prototypes.weight, every key under `module.`. The defaults are the released RN50's sizes."""
    torch.manual_seed(seed)
    trunk = ResNetTrunk("resnet50", width=width, base_width=64 * widen)
    sd = randomised(trunk, seed)
    if head:
        mlp = nn.Sequential(nn.Linear(trunk.out_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, feat))
        sd.update({f"projection_head.{n}": v for n, v in randomised(mlp, seed).items()})
        sd["prototypes.weight"] = torch.randn(k, feat)
    return {f"module.{n}": v for n, v in sd.items()}
