"""Shared helpers: a tiny CPU-sized config and generated image folders."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav_train import config

FASHION_MNIST_DIR = Path(config.FASHION_MNIST_DIR)


def tiny_config(**changes) -> config.TrainConfig:
    """A model and crops small enough that a step takes milliseconds on one core."""
    base = dict(
        dataset="folder", channels=3, image_size=16, resize_size=16,
        nmb_crops=(2, 2), size_crops=(16, 8), min_scale_crops=(0.3, 0.1), max_scale_crops=(1.0, 0.3),
        arch="resnet18", width=2, stem="small", hidden_mlp=16, feat_dim=8, nmb_prototypes=6,
        batch_size=8, epochs=2, warmup_epochs=1, base_lr=0.1, final_lr=0.001, freeze_prototypes_niters=1,
        queue_length=0, num_workers=0, progress=False, evaluate=False, threads=1,
        crash_guard=False)  # test_crash_guard.py and test_photos.py run the guard
    base.update(changes)
    return config.preset("imagenet").replace(**base)


def make_images(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (20, 18)) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sub = folder / f"part{i % 3}"  # nested, to exercise the recursive search
        sub.mkdir(exist_ok=True)
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"img{i:03d}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_images(tmp_path / "images", 32)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    # A missing data set is a failure with the reason, never a silent skip.
    missing = [p for p in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
               if not (FASHION_MNIST_DIR / p).exists()]
    assert not missing, f"Fashion-MNIST IDX files missing in {FASHION_MNIST_DIR}: {missing} (apt install dataset-fashion-mnist)"
    return FASHION_MNIST_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _polite_threads():
    torch.set_num_threads(1)
    yield
