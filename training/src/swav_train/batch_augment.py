"""The SwAV multi-crop on a whole batch of in-memory images at once (uint8 tensors -> crop tensors).

`augment.MultiCrop` transforms one PIL image at a time in DataLoader workers; on two CPU cores
those workers compete with the training step for the same cores, and the per-image Python calls
cost more than the arithmetic. Data sets that fit in memory as one uint8 tensor (Fashion-MNIST)
take this path instead: every step draws its crops in the training process, batched.

It draws from the same distributions as the PIL path:
- RandomResizedCrop: torchvision's parameter rule (area fraction ~ U[min, max], log aspect ratio
  ~ U[log 3/4, log 4/3], 10 attempts, then the centre-crop fallback), vectorised over the batch;
  the crop is resampled by `torchvision.ops.roi_align` (bilinear, averaging ceil(crop/size)^2
  samples per output pixel when it shrinks, as PIL's antialiased bilinear resize does);
- horizontal flip with p = 0.5;
- colour jitter with p = color_jitter_p: brightness and contrast factors ~ U[max(0, 1 - v), 1 + v]
  applied in a random order, as torchvision's ColorJitter; saturation, hue and RandomGrayscale
  change nothing on grey images, which are the only ones this path takes;
- Gaussian blur with p = blur_p, sigma ~ U[blur_sigma], edges replicated;
- normalisation by the config's mean and std.

Randomness: each step's crops come from a generator seeded by (seed, epoch, step, rank) alone, so
a run is reproducible under a seed and a run resumed at any step draws the crops an uninterrupted
one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from swav_train.config import TrainConfig

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_ATTEMPTS = 10


def step_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step's crops; distinct (seed, epoch, step, rank) give distinct streams."""
    key = ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank
    return torch.Generator().manual_seed(key % (2**63 - 1))


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator) -> Tensor:
    """n crop boxes (x1, y1, x2, y2) in pixel-edge coordinates, by torchvision's
    RandomResizedCrop.get_params rule (ratio 3/4 to 4/3), drawn for all n at once."""
    area = height * width
    target = area * torch.empty(n, _ATTEMPTS).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, _ATTEMPTS).uniform_(math.log(_RATIO[0]), math.log(_RATIO[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # The fallback when no attempt fits: the whole image, cropped to the ratio bounds.
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fw, fh = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        fw, fh = round(height * _RATIO[1]), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    cw = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw)))
    ch = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh)))
    # torch.randint(0, H - h + 1) per crop, as torchvision draws the offset after the size.
    u = torch.rand(n, 2, generator=gen)
    top = torch.floor(u[:, 0] * (height - ch + 1))
    left = torch.floor(u[:, 1] * (width - cw + 1))
    top = torch.where(first >= 0, top, torch.full((n,), float((height - fh) // 2)))
    left = torch.where(first >= 0, left, torch.full((n,), float((width - fw) // 2)))
    return torch.stack([left, top, left + cw, top + ch], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Each image's box resampled to size x size (float images N x C x H x W)."""
    n = images.shape[0]
    rois = torch.cat([torch.arange(n, dtype=images.dtype).unsqueeze(1), boxes.to(images.dtype)], dim=1)
    # sampling_ratio per box would vary; one ratio for the batch, from the largest shrink in it,
    # averages at least as many samples as PIL's antialias filter spans.
    shrink = float((boxes[:, 2:] - boxes[:, :2]).max()) / size
    ratio = max(1, math.ceil(shrink))
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)


def _factors(n: int, strength: float, gen: torch.Generator) -> Tensor:
    return torch.empty(n).uniform_(max(0.0, 1.0 - strength), 1.0 + strength, generator=gen)


def colour_jitter(x: Tensor, brightness: float, contrast: float, p: float, gen: torch.Generator) -> Tensor:
    """torchvision's ColorJitter(brightness, contrast) with probability p, per image."""
    n = x.shape[0]
    apply = torch.rand(n, generator=gen) < p
    b = _factors(n, brightness, gen).view(n, 1, 1, 1) if brightness > 0 else None
    c = _factors(n, contrast, gen).view(n, 1, 1, 1) if contrast > 0 else None
    contrast_first = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)

    def bright(t: Tensor) -> Tensor:
        return t if b is None else (t * b).clamp(0, 1)

    def contr(t: Tensor) -> Tensor:
        if c is None:
            return t
        mean = t.mean(dim=(1, 2, 3), keepdim=True)  # grey images: the grayscale mean torchvision blends with
        return (c * t + (1 - c) * mean).clamp(0, 1)

    out = torch.where(contrast_first, bright(contr(x)), contr(bright(x)))
    return torch.where(apply.view(n, 1, 1, 1), out, x)


def gaussian_blur(x: Tensor, p: float, sigma: tuple[float, ...], gen: torch.Generator) -> Tensor:
    """Gaussian blur with probability p and sigma ~ U[sigma], a separable kernel per image."""
    n, c, h, w = x.shape
    apply = torch.rand(n, generator=gen) < p
    s = torch.empty(n).uniform_(sigma[0], sigma[1], generator=gen)
    if not bool(apply.any()):
        return x
    radius = max(1, min(math.ceil(3 * sigma[1]), min(h, w) - 1))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / s.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return torch.where(apply.view(n, 1, 1, 1), y.view(n, c, h, w), x)


class BatchMultiCrop:
    """The multi-crop of `cfg` on a batch of grey uint8 images (N x H x W): a list of
    cfg.total_crops normalised float tensors (N x channels x size x size), in the PIL path's order."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.specs: list[tuple[int, float, float]] = []
        for n, size, lo, hi in zip(cfg.nmb_crops, cfg.size_crops, cfg.min_scale_crops, cfg.max_scale_crops):
            self.specs += [(size, lo, hi)] * n
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: Tensor, gen: torch.Generator) -> list[Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"expected N x H x W uint8 images, got {tuple(images.shape)} {images.dtype}")
        x = images.unsqueeze(1).float().div_(255.0)
        n, _, height, width = x.shape
        b, c, _, _ = self.cfg.color_jitter
        crops = []
        for size, lo, hi in self.specs:
            y = resized_crops(x, crop_boxes(n, height, width, (lo, hi), gen), size)
            flip = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)
            y = torch.where(flip, y.flip(-1), y)
            y = colour_jitter(y, b, c, self.cfg.color_jitter_p, gen)
            y = gaussian_blur(y, self.cfg.blur_p, self.cfg.blur_sigma, gen)
            if self.cfg.channels == 3:
                y = y.expand(-1, 3, -1, -1)
            crops.append(((y - self.mean) / self.std).contiguous())
        return crops


class BatchCropLoader:
    """One epoch of multi-crop batches of in-memory grey images, drawn in the training process.

    `order` is the epoch's sample order for this rank (as the DataLoader's sampler would give it);
    `start` skips to a step, and the crops from there are those an uninterrupted epoch draws."""

    def __init__(self, images: Tensor, order: list[int] | Tensor, cfg: TrainConfig, epoch: int, rank: int,
                 steps: int, start: int = 0):
        self.images = images
        self.order = torch.as_tensor(order, dtype=torch.long)
        self.transform = BatchMultiCrop(cfg)
        self.cfg, self.epoch, self.rank, self.steps, self.start = cfg, epoch, rank, steps, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[Tensor]]:
        bs = self.cfg.batch_size
        for step in range(self.start, self.steps):
            idx = self.order[step * bs:(step + 1) * bs]
            gen = step_generator(self.cfg.seed, self.epoch, step, self.rank)
            yield self.transform(self.images[idx], gen)
