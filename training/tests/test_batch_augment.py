"""The batched tensor multi-crop draws from the PIL path's distributions, is seeded, and resumes."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import tiny_config
from swav_train import batch_augment as ba
from swav_train import cli
from swav_train.augment import MultiCrop, crop_transform
from swav_train.config import ConfigError, preset
from swav_train.data import load_fashion_mnist

DRAWS = 4000


def _pil_params(size: tuple[int, int], scale: tuple[float, float], n: int) -> np.ndarray:
    img = Image.new("L", size)
    out = [T.RandomResizedCrop.get_params(img, scale=scale, ratio=(3 / 4, 4 / 3)) for _ in range(n)]
    return np.array([(w * h, w / h) for _, _, h, w in out], dtype=np.float64)


def _tensor_params(size: tuple[int, int], scale: tuple[float, float], n: int) -> np.ndarray:
    boxes = ba.crop_boxes(n, size[1], size[0], scale, torch.Generator().manual_seed(5)).numpy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= size[0]).all() and (boxes[:, 3] <= size[1]).all()
    assert (w == np.round(w)).all() and (h == np.round(h)).all()  # whole pixels, as torchvision's
    return np.stack([w * h, w / h], axis=1)


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14), (0.9, 1.0)])
@pytest.mark.parametrize("size", [(28, 28), (40, 20)])
def test_crop_area_and_aspect_match_torchvision(size, scale):
    torch.manual_seed(3)
    pil, ours = _pil_params(size, scale, DRAWS), _tensor_params(size, scale, DRAWS)
    area = size[0] * size[1]
    for column, what, tol in ((0, "area fraction", 0.015), (1, "aspect ratio", 0.02)):
        a, b = pil[:, column], ours[:, column]
        if column == 0:
            a, b = a / area, b / area
        assert abs(a.mean() - b.mean()) < tol, (what, a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 2 * tol, (what, a.std(), b.std())
        assert abs(np.quantile(a, 0.1) - np.quantile(b, 0.1)) < 3 * tol, what
        assert abs(np.quantile(a, 0.9) - np.quantile(b, 0.9)) < 3 * tol, what


def test_fallback_is_torchvisions_centre_crop():
    # A 100 x 10 image cannot hold a 3/4..4/3 crop of 90-100 % of its area: every draw falls back.
    boxes = ba.crop_boxes(50, 10, 100, (0.9, 1.0), torch.Generator().manual_seed(0))
    i, j, h, w = T.RandomResizedCrop.get_params(Image.new("L", (100, 10)), scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    assert boxes.tolist() == [[j, i, j + w, i + h]] * 50


def _ramp() -> np.ndarray:
    return np.tile(np.linspace(10, 245, 28).astype(np.uint8), (28, 1))  # dark left, bright right


def _both_paths(cfg, image: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n crops of one image through each path, in [0, 1] (normalisation undone)."""
    torch.manual_seed(11)
    size, lo, hi = cfg.size_crops[0], cfg.min_scale_crops[0], cfg.max_scale_crops[0]
    t = crop_transform(cfg, size, lo, hi)
    pil = torch.stack([t(Image.fromarray(image, mode="L")) for _ in range(n)])
    batch = torch.from_numpy(np.repeat(image[None], n, axis=0))
    ours = ba.BatchMultiCrop(cfg.replace(nmb_crops=(2,), size_crops=(size,), min_scale_crops=(lo,),
                                         max_scale_crops=(hi,)))(batch, torch.Generator().manual_seed(2))[0]
    undo = lambda x: x * cfg.std[0] + cfg.mean[0]  # noqa: E731
    return undo(pil), undo(ours)


def test_flip_rate_matches():
    cfg = preset("fashion-mnist").replace(color_jitter_p=0.0, blur_p=0.0, min_scale_crops=(0.9, 0.05),
                                          max_scale_crops=(1.0, 0.14))
    pil, ours = _both_paths(cfg, _ramp(), 2000)

    def flipped(x):  # the ramp rises to the right unless flipped
        return (x[..., :, :8].mean(dim=(1, 2, 3)) > x[..., :, -8:].mean(dim=(1, 2, 3))).float().mean().item()

    assert abs(flipped(pil) - 0.5) < 0.04 and abs(flipped(ours) - 0.5) < 0.04
    assert abs(flipped(pil) - flipped(ours)) < 0.05


def test_brightness_and_contrast_match():
    cfg = preset("fashion-mnist").replace(blur_p=0.0, min_scale_crops=(0.95, 0.05), max_scale_crops=(1.0, 0.14))
    images, _ = load_fashion_mnist(cfg.fashion_mnist_dir, "t10k")
    for image in (images[0], images[1]):
        pil, ours = _both_paths(cfg, image, 2000)
        m_pil, m_ours = pil.mean(dim=(1, 2, 3)), ours.mean(dim=(1, 2, 3))
        s_pil, s_ours = pil.std(dim=(1, 2, 3)), ours.std(dim=(1, 2, 3))
        assert abs(m_pil.mean() - m_ours.mean()) < 0.01, (m_pil.mean(), m_ours.mean())  # brightness mean
        assert abs(m_pil.std() - m_ours.std()) < 0.01, (m_pil.std(), m_ours.std())  # its spread over draws
        assert abs(s_pil.mean() - s_ours.mean()) < 0.01, (s_pil.mean(), s_ours.mean())  # contrast
        # jitter is applied with p = 0.8: about a fifth of draws keep the image's own brightness
        same = lambda m: ((m - m.median()).abs() < 1e-3).float().mean()  # noqa: E731
        assert abs(float(same(m_ours)) - float(same(m_pil))) < 0.05


def test_full_multicrop_matches_in_pixel_statistics():
    """Everything on (crops, flip, jitter, blur), per crop resolution of the fashion-mnist preset.

    The blur is the paper's sigma range: below about 0.5, PIL's box-blur approximation of a Gaussian
    blurs less than the Gaussian of that sigma this path applies (with the preset's 0.1-0.5 the crops'
    pixel spread is about 5 % lower here; training/BENCHMARKS.md)."""
    cfg = preset("fashion-mnist").replace(blur_sigma=(0.1, 2.0))
    images, _ = load_fashion_mnist(cfg.fashion_mnist_dir, "t10k")
    image = images[7]
    torch.manual_seed(0)
    pil = [torch.stack(c) for c in zip(*(MultiCrop(cfg)(Image.fromarray(image, mode="L")) for _ in range(3000)))]
    ours = ba.BatchMultiCrop(cfg)(torch.from_numpy(np.repeat(image[None], 3000, axis=0)),
                                  torch.Generator().manual_seed(1))
    assert [c.shape for c in pil] == [c.shape for c in ours]
    for p, o in zip(pil, ours):
        # in normalised units; the standard error of the difference of means is about 0.011
        assert abs(p.mean() - o.mean()) < 0.04, (p.mean(), o.mean())
        assert abs(p.std() - o.std()) < 0.03, (p.std(), o.std())
        per_crop = lambda x: x.mean(dim=(1, 2, 3)).std()  # noqa: E731  # how much crops of one image differ
        assert abs(per_crop(p) - per_crop(o)) < 0.03, (per_crop(p), per_crop(o))
        # the spatial energy (how sharp the crops are) also agrees: blur and resampling
        grad = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
        assert abs(grad(p) - grad(o)) < 0.1 * grad(p), (grad(p), grad(o))


def test_seeded_and_resumes_mid_epoch_to_the_same_crops():
    cfg = preset("fashion-mnist").replace(batch_size=16)
    images = torch.from_numpy(np.array(load_fashion_mnist(cfg.fashion_mnist_dir, "t10k")[0][:160]))
    order = torch.randperm(160, generator=torch.Generator().manual_seed(4))
    full = list(ba.BatchCropLoader(images, order, cfg, epoch=3, rank=0, steps=10))
    again = list(ba.BatchCropLoader(images, order, cfg, epoch=3, rank=0, steps=10))
    resumed = list(ba.BatchCropLoader(images, order, cfg, epoch=3, rank=0, steps=10, start=6))
    assert len(full) == 10 and len(resumed) == 4
    for a, b in zip(full, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(full[6:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = next(iter(ba.BatchCropLoader(images, order, cfg, epoch=4, rank=0, steps=1)))
    other_rank = next(iter(ba.BatchCropLoader(images, order, cfg, epoch=3, rank=1, steps=1)))
    assert not torch.equal(full[0][0], other_epoch[0]) and not torch.equal(full[0][0], other_rank[0])


def test_tensor_path_needs_in_memory_data():
    with pytest.raises(ConfigError, match="augment"):
        tiny_config(augment="tensor")
    assert preset("fashion-mnist").tensor_augment and not tiny_config().tensor_augment
    assert not preset("fashion-mnist").replace(augment="pil").tensor_augment


@pytest.mark.parametrize("stem,embedding_layer", [("small", 4), ("small-stride2", 3)])
def test_smoke_run_of_the_tensor_path_writes_a_valid_bundle(tmp_path, fashion_mnist_dir, stem, embedding_layer):
    run = tmp_path / "run"
    cfg = preset("fashion-mnist").replace(
        max_images=512, batch_size=64, epochs=2, warmup_epochs=1, width=4, stem=stem, hidden_mlp=32, feat_dim=16,
        embedding_layer=embedding_layer,
        nmb_prototypes=20, queue_length=0, freeze_prototypes_niters=2, threads=1, progress=False,
        crash_guard=False, fashion_mnist_dir=str(fashion_mnist_dir))
    assert cfg.tensor_augment
    cfg.save(tmp_path / "cfg.json")
    assert cli.main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(run),
                     "--eval-train-size", "500", "--eval-test-size", "200"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert steps[-1]["step"] == 2 * 8 - 1  # 512 / 64 = 8 steps per epoch
    assert all(math.isfinite(x["loss"]) for x in steps)
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["training"]["stem"] == stem and manifest["training"]["augment"] == "auto"
    session = ort.InferenceSession(str(run / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    side = manifest["input"]["height"]
    assert side == manifest["input"]["width"] == cfg.image_size  # the preset serves 28 px images at 32 px
    emb, proj, scores = session.run(None, {"images": np.random.default_rng(0).random((3, 1, side, side), np.float32)})
    # width 4: stage 3 has 16 channels, stage 4 has 32
    emb_dim = {3: 16, 4: 32}[embedding_layer]
    assert emb.shape == (3, emb_dim) and proj.shape == (3, 16) and scores.shape == (3, 20)
    assert manifest["outputs"]["embedding"]["dim"] == emb_dim
    assert manifest["training"]["embedding_layer"] == embedding_layer
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert 0.1 <= manifest["evaluation"]["knn_top1"] <= 1.0
