"""Build the tiny test bundles the Rust tests use (no PyTorch needed on that side).

    python training/scripts/make_fixtures.py --out tests/fixtures/bundles

Writes OUT/tiny-gray (1x28x28, a few iterations on Fashion-MNIST, K=10) and
OUT/tiny-rgb (3x32x32, a few iterations on generated RGB images, K=8), each a
bundle per docs/bundle.md with golden/ cases covering the decoder paths the
server must get right (no resize for each bundle, resize + crop, alpha, baseline and
progressive JPEG, 16-bit PNG, palette PNG, EXIF orientation, CMYK JPEG).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from swav_train import checkpoint, config, export
from swav_train.data import load_fashion_mnist
from swav_train.train import train

GOLDEN_DIGITS = 7  # significant digits kept in golden.json: far below the 2/255 and 1e-4 tolerances


def _smooth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colourful image (gradients + a disc); JPEG codecs agree closely on such content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.4) * min(w, h)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r ** 2).astype(np.float64)
    red = 255 * x / max(w - 1, 1)
    green = 255 * y / max(h - 1, 1)
    blue = 128 + 100 * np.sin(x / 5 + rng.uniform(0, 3)) * np.cos(y / 7)
    img = np.stack([red, green, blue], axis=-1) * (1 - 0.5 * disc[..., None]) + 90 * disc[..., None]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def golden_inputs(out: Path, fashion_mnist_dir: str) -> list[Path]:
    """Write the golden input files into `out` and return them in a fixed order."""
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(out / name, **kw)
        files.append(out / name)

    test_images, _ = load_fashion_mnist(fashion_mnist_dir, "t10k")
    save("gray_28.png", Image.fromarray(test_images[0]))
    save("rgb_32x32.png", Image.fromarray(_smooth_rgb(32, 32, 8)))  # tiny-rgb's input size: no resize
    save("rgb_50x37.png", Image.fromarray(_smooth_rgb(50, 37, 1)))
    rgba = np.dstack([_smooth_rgb(40, 40, 2), np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1))])
    rgba[:10, :10, 3] = 0  # a fully transparent corner
    save("rgba_40x40.png", Image.fromarray(rgba, mode="RGBA"))
    save("baseline_64x48.jpg", Image.fromarray(_smooth_rgb(64, 48, 3)), quality=92)
    save("progressive_48x64.jpg", Image.fromarray(_smooth_rgb(48, 64, 4)), quality=92, progressive=True)
    ramp = (np.add.outer(np.arange(30), np.arange(30)) * (65535 / 58)).astype(np.uint16)
    save("gray16_30x30.png", Image.fromarray(ramp))
    save("palette_36x36.png", Image.fromarray(_smooth_rgb(36, 36, 5)).convert("P", palette=Image.ADAPTIVE, colors=32))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored image must be rotated 90 degrees clockwise
    save("exif_orient6_40x30.jpg", Image.fromarray(_smooth_rgb(40, 30, 6)), quality=92, exif=exif.tobytes())
    save("cmyk_40x40.jpg", Image.fromarray(_smooth_rgb(40, 40, 7)).convert("CMYK"), quality=92)
    _check_modes(files)
    return files


def _check_modes(files: list[Path]) -> None:
    """Fail if PIL did not write what the case claims to cover."""
    expect = {"gray_28.png": "L", "rgba_40x40.png": "RGBA", "gray16_30x30.png": "I;16", "palette_36x36.png": "P",
              "cmyk_40x40.jpg": "CMYK"}
    for f in files:
        with Image.open(f) as img:
            if f.name in expect and img.mode != expect[f.name]:
                raise SystemExit(f"{f}: PIL wrote mode {img.mode}, expected {expect[f.name]}")
            if f.name.startswith("progressive") and not img.info.get("progressive"):
                raise SystemExit(f"{f}: not progressive")
            if f.name.startswith("exif") and img.getexif().get(0x0112) != 6:
                raise SystemExit(f"{f}: EXIF orientation 6 missing")


def rgb_training_folder(out: Path, count: int = 64) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(_smooth_rgb(40 + i % 9, 36 + i % 7, 100 + i)).save(out / f"img_{i:03d}.png")
    return out


def tiny_gray_config(fashion_mnist_dir: str) -> config.TrainConfig:
    return config.preset("fashion-mnist").replace(
        name="tiny-gray", description="test fixture: a few iterations on Fashion-MNIST (not a useful model)",
        fashion_mnist_dir=fashion_mnist_dir, max_images=256, width=4, hidden_mlp=64, feat_dim=32,
        nmb_prototypes=10, batch_size=32, epochs=1, warmup_epochs=0, base_lr=0.3, final_lr=0.003,
        freeze_prototypes_niters=2, queue_length=0, num_workers=0, evaluate=False, progress=False, threads=2,
        channels_last=False)


def tiny_rgb_config(data_dir: Path) -> config.TrainConfig:
    return config.preset("imagenet").replace(
        name="tiny-rgb", description="test fixture: a few iterations on generated RGB images (not a useful model)",
        dataset="folder", data_dir=str(data_dir), channels=3, image_size=32, resize_size=32,
        nmb_crops=[2, 2], size_crops=[32, 16], min_scale_crops=[0.3, 0.1], max_scale_crops=[1.0, 0.3],
        arch="resnet18", width=4, stem="small", hidden_mlp=64, feat_dim=32, nmb_prototypes=8, batch_size=16,
        epochs=1, warmup_epochs=0, base_lr=0.3, final_lr=0.003, freeze_prototypes_niters=2, queue_length=0,
        num_workers=0, evaluate=False, progress=False, threads=2, channels_last=False)


def _shrink_golden(golden_json: Path) -> None:
    doc = json.loads(golden_json.read_text())
    for case in doc["cases"]:
        for key in ("tensor", "embedding", "projection", "prototype_scores"):
            case[key] = [float(f"{v:.{GOLDEN_DIGITS}g}") for v in case[key]]
    golden_json.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def build(cfg: config.TrainConfig, work: Path, out: Path, golden: list[Path]) -> Path:
    run = work / cfg.name
    result = train(cfg, run, resume=False, finish=False)
    model, cfg_loaded, _ = checkpoint.model_from_checkpoint(run / "checkpoint.pt")
    if out.exists():
        shutil.rmtree(out)
    export.export_bundle(model, cfg_loaded, out, dataset={"name": cfg.dataset, "num_images": cfg.max_images or None},
                         golden_files=golden)
    _shrink_golden(out / "golden" / "golden.json")
    print(f"{out}: {result.epochs_done} epoch(s), {len(result.losses)} iterations, "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory receiving tiny-gray/ and tiny-rgb/")
    parser.add_argument("--fashion-mnist-dir", default=config.FASHION_MNIST_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        golden = golden_inputs(work / "golden", args.fashion_mnist_dir)
        build(tiny_gray_config(args.fashion_mnist_dir), work, args.out / "tiny-gray", golden)
        rgb_data = rgb_training_folder(work / "rgb-data")
        rgb_cfg = tiny_rgb_config(rgb_data)
        bundle = build(rgb_cfg, work, args.out / "tiny-rgb", golden)
        # The data path pointed into a temporary directory; record what it was instead.
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["training"]["data_dir"] = "<generated by training/scripts/make_fixtures.py>"
        manifest["dataset"] = {"name": "generated-rgb", "num_images": 64}
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
