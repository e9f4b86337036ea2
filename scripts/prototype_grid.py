#!/usr/bin/env python3
"""Draws what a model's prototypes hold: one row per prototype, the largest first, each row showing the
test images that score highest on it.

    scripts/prototype_grid.py [--bundle models/fashion-mnist] [--out BUNDLE/prototypes.png]

Runs the bundle's model.onnx with onnxruntime (no PyTorch) on the Fashion-MNIST test set (IDX files,
Debian's dataset-fashion-mnist), assigns every image to its prototype (argmax of `prototype_scores`),
and writes a PNG. With labels, each row also names its most common class and its share of the row's
prototype. Needs numpy, Pillow and onnxruntime, not PyTorch.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

# The trainer's preprocessing (numpy and PIL only, no PyTorch) is the rule the model was trained with;
# taken from the source tree when the training environment is not installed.
sys.path.append(str(Path(__file__).resolve().parents[1] / "training" / "src"))
from swav_train.preprocess import InputSpec, to_array  # noqa: E402

DATASET = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SCHEMA_VERSIONS = (1, 2)  # docs/bundle.md; version 2 lets the projection and prototypes be absent
IDX_IMAGES, IDX_LABELS = 0x803, 0x801
PAD, LABEL_WIDTH = 2, 112


@dataclass
class Row:
    prototype: int
    size: int
    members: list[int]  # test-set indices, highest score first
    majority: str | None = None
    purity: float | None = None


# --- inputs -----------------------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array; images are N×rows×cols, labels N."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise SystemExit(f"error: {path}: not an IDX file of type {magic:#x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SystemExit(f"error: {path}: header says {dims}, file holds {body.size} bytes of data")
    return body.reshape(dims)


def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: {path}: {err}") from err
    if manifest.get("schema_version") not in SCHEMA_VERSIONS:
        raise SystemExit(f"error: {path}: schema_version {manifest.get('schema_version')!r}, this script reads "
                         f"{' and '.join(map(str, SCHEMA_VERSIONS))}")
    if not (manifest.get("outputs") or {}).get("prototype_scores"):
        raise SystemExit(f"error: {path}: the model has no prototypes (outputs.prototype_scores is absent), so there is no grid to draw")
    model = bundle / manifest["model_file"]
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    if digest != manifest["model_sha256"]:
        raise SystemExit(f"error: {model}: sha256 {digest} does not match the manifest's {manifest['model_sha256']}")
    return manifest


# --- the model ----------------------------------------------------------------------------------------


def input_spec(manifest: dict) -> InputSpec:
    try:
        return InputSpec.from_manifest(manifest.get("input"))
    except ValueError as e:
        raise SystemExit(f"error: the manifest's input rule: {e}") from None


def prototype_scores(bundle: Path, manifest: dict, images: np.ndarray, batch: int = 256) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / manifest["model_file"]), providers=["CPUExecutionProvider"])
    spec = input_spec(manifest)
    input_name = manifest["input"]["name"]
    output = manifest["outputs"]["prototype_scores"]["name"]
    chunks = []
    for start in range(0, len(images), batch):
        tensor = np.stack([to_array(Image.fromarray(img, mode="L"), spec) for img in images[start : start + batch]])
        chunks.append(session.run([output], {input_name: tensor})[0])
    return np.concatenate(chunks)


# --- the figure ----------------------------------------------------------------------------------------


def choose_rows(scores: np.ndarray, labels: np.ndarray | None, rows: int, cols: int) -> list[Row]:
    assignment = scores.argmax(axis=1)
    best = scores.max(axis=1)
    sizes = np.bincount(assignment, minlength=scores.shape[1])
    order = [p for p in np.argsort(-sizes, kind="stable") if sizes[p] > 0][:rows]
    chosen = []
    for p in order:
        members = np.flatnonzero(assignment == p)
        members = members[np.argsort(-best[members], kind="stable")]
        row = Row(int(p), int(sizes[p]), [int(i) for i in members[:cols]])
        if labels is not None:
            counts = np.bincount(labels[members], minlength=len(CLASSES))
            row.majority, row.purity = CLASSES[int(counts.argmax())], float(counts.max() / counts.sum())
        chosen.append(row)
    return chosen


def grid_size(rows: int, cols: int, cell: int) -> tuple[int, int]:
    """(width, height) of the figure for that many rows and columns of cell×cell images."""
    return LABEL_WIDTH + cols * (cell + PAD) + PAD, rows * (cell + PAD) + PAD


def draw(rows: list[Row], images: np.ndarray, cols: int, scale: int) -> Image.Image:
    cell = images.shape[1] * scale
    canvas = Image.new("L", grid_size(len(rows), cols, cell), color=255)
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        y = PAD + r * (cell + PAD)
        text = f"prototype {row.prototype}\n{row.size} images"
        if row.majority is not None:
            text += f"\n{row.majority} ({row.purity:.0%})"
        pen.multiline_text((4, y + 2), text, fill=0, font=font, spacing=2)
        for c, index in enumerate(row.members):
            tile = Image.fromarray(images[index], mode="L").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + PAD + c * (cell + PAD), y))
    return canvas


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--images", type=Path, default=DATASET / "t10k-images-idx3-ubyte.gz")
    parser.add_argument("--labels", type=Path, default=DATASET / "t10k-labels-idx1-ubyte.gz",
                        help="IDX labels to name each row's majority class; 'none' to leave them out")
    parser.add_argument("--rows", type=int, default=10, help="prototypes shown, the largest first")
    parser.add_argument("--cols", type=int, default=12, help="images per prototype, the highest scores first")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--scale", type=int, default=2, help="pixel size of each image in the figure")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: BUNDLE/prototypes.png)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.cols < 1 or args.scale < 1:
        parser.error("--rows, --cols and --scale must be at least 1")

    manifest = load_manifest(args.bundle)
    images = read_idx(args.images, IDX_IMAGES)[: args.limit]
    labels = None if str(args.labels) == "none" else read_idx(args.labels, IDX_LABELS)[: args.limit]
    if labels is not None and len(labels) != len(images):
        raise SystemExit(f"error: {args.labels}: {len(labels)} labels for {len(images)} images")
    rows = choose_rows(prototype_scores(args.bundle, manifest, images), labels, args.rows, args.cols)
    out = args.out or args.bundle / "prototypes.png"
    draw(rows, images, args.cols, args.scale).save(out, optimize=True)
    print(f"{out}: {len(rows)} prototypes of {manifest['num_prototypes']}, {len(images)} images ({manifest['name']})")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
