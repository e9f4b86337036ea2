"""The SwAV multi-crop transform (PIL image -> list of normalised crop tensors)."""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from swav_train.config import TrainConfig


class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and sigma ~ U[lo, hi], as the paper's
    PILRandomGaussianBlur; draws from torch's RNG so that seeding covers it."""

    def __init__(self, p: float, sigma: tuple[float, ...]):
        self.p, self.lo, self.hi = p, float(sigma[0]), float(sigma[1])

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        radius = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def _colour_steps(cfg: TrainConfig) -> list:
    b, c, s, h = cfg.color_jitter
    if cfg.channels == 1:
        # Saturation, hue and grayscale mean nothing for one channel.
        return [T.RandomApply([T.ColorJitter(brightness=b, contrast=c)], p=cfg.color_jitter_p)]
    return [T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.color_jitter_p), T.RandomGrayscale(p=cfg.grayscale_p)]


def crop_transform(cfg: TrainConfig, size: int, min_scale: float, max_scale: float) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, max_scale)),
        T.RandomHorizontalFlip(p=0.5),
        *_colour_steps(cfg),
        RandomGaussianBlur(cfg.blur_p, cfg.blur_sigma),
        T.ToTensor(),
        T.Normalize(mean=cfg.mean, std=cfg.std),
    ])


class MultiCrop:
    """nmb_crops[i] crops of size_crops[i] with scale in [min_scale_crops[i], max_scale_crops[i]], in order."""

    def __init__(self, cfg: TrainConfig):
        self.transforms: list[T.Compose] = []
        for n, size, lo, hi in zip(cfg.nmb_crops, cfg.size_crops, cfg.min_scale_crops, cfg.max_scale_crops):
            self.transforms += [crop_transform(cfg, size, lo, hi)] * n

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]
