"""Training smoke runs on a folder of RGB photos of mixed formats (issue 20).

Each run is `python -m swav_train train` in a subprocess, as a user runs it: 2 steps, then the
export, whose onnxruntime parity check must pass. The options that decided whether oneDNN crashed
(stem, width 8 or 16, channels_last, 1 or 3 input channels) vary over the runs: every pair of
values of any two options appears in some run (6 runs, two of them the configurations of the
issue's report: width 8, 3 channels, channels_last, each stem). Small
stem runs at 64 px, ImageNet stem at 224 px: the sizes at which the narrow strided 1x1
convolution crashed. The runs start together, two at a time, in a session fixture; each test
checks one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("tiff", "TIFF"), ("bmp", "BMP"), ("webp", "WEBP"), ("gif", "GIF"))
PHOTOS = 18  # 3 per format: 2 steps of batch 8
# (stem, width, channels_last, channels)
RUNS = (
    ("small", 8, True, 3),       # the report, small stem
    ("imagenet", 8, True, 3),    # the report, ImageNet stem
    ("small", 16, False, 1),
    ("imagenet", 8, False, 1),
    ("imagenet", 16, True, 1),
    ("imagenet", 16, False, 3),
)


def make_photos(folder: Path, count: int = PHOTOS) -> Path:
    """Smooth RGB scenes with noise (photo-like, unlike uniform noise), of several sizes and every format."""
    rng = np.random.default_rng(20)
    folder.mkdir(parents=True)
    for i in range(count):
        w, h = int(rng.integers(72, 120)), int(rng.integers(64, 110))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(0.02, 0.15, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 127 + 90 * np.sin(fx * xx + fy * yy + phase)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        suffix, fmt = FORMATS[i % len(FORMATS)]
        sub = folder / ("day" if i % 2 else "night")
        sub.mkdir(exist_ok=True)
        pil.save(sub / f"photo{i:02d}.{suffix}", fmt)
    return folder


def _name(run) -> str:
    stem, width, channels_last, channels = run
    return f"{stem}-w{width}-{'cl' if channels_last else 'contiguous'}-{channels}ch"


def _command(run, photos: Path, out: Path) -> list[str]:
    stem, width, channels_last, channels = run
    size, small = (64, 32) if stem == "small" else (224, 96)
    mean, std = ([0.5] * channels, [0.25] * channels)
    return [sys.executable, "-m", "swav_train", "train", "--preset", "imagenet", "--data-dir", str(photos),
            "--out", str(out), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
            "--arch", "resnet18", "--width", str(width), "--stem", stem, "--channels", str(channels),
            "--mean", *map(str, mean), "--std", *map(str, std), "--image-size", str(size),
            "--resize-size", str(size), "--nmb-crops", "2", "2", "--size-crops", str(size), str(small),
            "--hidden-mlp", "32", "--feat-dim", "16", "--nmb-prototypes", "16", "--freeze-prototypes-niters", "1",
            "--threads", "1", "--num-workers", "0", "--no-evaluate", "--no-progress",
            "--channels-last" if channels_last else "--no-channels-last"]


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("photos")
    photos = make_photos(root / "photos")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run):
        out = root / _name(run)
        proc = subprocess.run(_command(run, photos, out), capture_output=True, text=True, timeout=600, env=env)
        return run, (proc, out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(launch, RUNS))


def test_the_runs_cover_every_pair_of_option_values():
    for a in range(4):
        for b in range(a + 1, 4):
            pairs = {(r[a], r[b]) for r in RUNS}
            values_a, values_b = {r[a] for r in RUNS}, {r[b] for r in RUNS}
            assert len(values_a) == len(values_b) == 2
            assert pairs == {(x, y) for x in values_a for y in values_b}, (a, b)


def test_photo_folder_holds_every_format(tmp_path):
    seen = {}
    for path in make_photos(tmp_path / "photos").rglob("*"):
        if path.is_file():
            with Image.open(path) as img:
                seen[img.format] = img.mode
    assert set(seen) == {fmt for _, fmt in FORMATS}
    assert seen["JPEG"] == seen["PNG"] == "RGB" and seen["GIF"] == "P"


@pytest.mark.parametrize("run", RUNS, ids=[_name(r) for r in RUNS])
def test_two_steps_on_photos_then_a_bundle_that_passes_parity(smoke_runs, run):
    proc, out = smoke_runs[run]
    stem, width, channels_last, channels = run
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in steps if s["kind"] == "train"}) == [0, 1]
    assert all(np.isfinite(s["loss"]) for s in steps)
    # On a CPU where the trial step died, the guard would have switched channels_last off (and said
    # so); the layer exclusions of model.to_channels_last are meant to make that unnecessary.
    config = json.loads((out / "config.json").read_text())
    assert config["channels_last"] == channels_last, \
        f"the crash guard switched the memory format on this CPU:\n{proc.stderr[-4000:]}"

    bundle = out / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["dataset"]["num_images"] == PHOTOS and manifest["dataset"]["skipped_unreadable"] == 0
    inp = manifest["input"]
    assert (inp["channels"], inp["height"]) == (channels, 64 if stem == "small" else 224)
    assert manifest["training"]["width"] == width and manifest["training"]["stem"] == stem
    # the golden cases (training photos, PyTorch's outputs) again through onnxruntime
    golden = json.loads((bundle / "golden" / "golden.json").read_text())["cases"]
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert len(golden) == 4
    for case in golden:
        tensor = np.asarray(case["tensor"], np.float32).reshape(1, channels, inp["height"], inp["width"])
        embedding, projection, _ = session.run(None, {"images": tensor})
        np.testing.assert_allclose(embedding[0], case["embedding"], atol=1e-4)
        np.testing.assert_allclose(projection[0], case["projection"], atol=1e-4)
