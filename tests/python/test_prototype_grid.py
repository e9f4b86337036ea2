"""scripts/prototype_grid.py on the trainer's fixture bundles and a small IDX file made here."""

from __future__ import annotations

import gzip
import json
import importlib.util
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from repo_tools import REPO, fixture_bundle

spec = importlib.util.spec_from_file_location("prototype_grid", REPO / "scripts" / "prototype_grid.py")
grid = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = grid  # dataclasses look their module up there
spec.loader.exec_module(grid)


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_files(tmp_path):
    rng = np.random.default_rng(7)
    # Varied images: random blobs of different brightness, so prototypes differ in what they pick.
    images = (rng.random((90, 28, 28)) * rng.integers(40, 256, size=(90, 1, 1))).astype(np.uint8)
    labels = rng.integers(0, 10, size=90).astype(np.uint8)
    write_idx(tmp_path / "images.gz", images, grid.IDX_IMAGES)
    write_idx(tmp_path / "labels.gz", labels, grid.IDX_LABELS)
    return tmp_path / "images.gz", tmp_path / "labels.gz", images


@pytest.mark.parametrize("bundle_name", ["tiny-gray", "tiny-rgb"])
def test_grid_has_one_row_per_largest_prototype(bundle_name, idx_files, tmp_path):
    images_path, labels_path, images = idx_files
    bundle = fixture_bundle(bundle_name)
    out = tmp_path / "grid.png"
    rows = grid.main([
        "--bundle", str(bundle), "--images", str(images_path), "--labels", str(labels_path),
        "--limit", "80", "--rows", "4", "--cols", "5", "--scale", "1", "--out", str(out),
    ])  # fmt: skip

    assert 1 <= len(rows) <= 4
    sizes = [row.size for row in rows]
    assert sizes == sorted(sizes, reverse=True)
    assert len({row.prototype for row in rows}) == len(rows)
    for row in rows:
        assert len(row.members) == min(5, row.size)
        assert all(0 <= i < 80 for i in row.members)
        assert row.majority in grid.CLASSES and 0 < row.purity <= 1
    with Image.open(out) as png:
        assert png.size == grid.grid_size(len(rows), 5, 28)


def test_rows_follow_the_argmax_and_the_scores():
    scores = np.array([
        [0.9, 0.1, 0.0],
        [0.8, 0.2, 0.0],
        [0.1, 0.7, 0.0],
        [0.95, 0.0, 0.1],
    ])  # fmt: skip
    labels = np.array([3, 3, 1, 2])
    rows = grid.choose_rows(scores, labels, rows=5, cols=2)
    assert [(r.prototype, r.size, r.members) for r in rows] == [(0, 3, [3, 0]), (1, 1, [2])]
    assert rows[0].majority == grid.CLASSES[3] and rows[0].purity == pytest.approx(2 / 3)


def test_bundle_with_a_wrong_checksum_is_refused(tmp_path):
    bundle = fixture_bundle("tiny-gray")
    for name in ("manifest.json", "model.onnx"):
        (tmp_path / name).write_bytes((bundle / name).read_bytes())
    with open(tmp_path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit, match="sha256"):
        grid.load_manifest(tmp_path)


@pytest.mark.parametrize("version, prototypes, accepted", [(2, True, True), (3, True, False), (2, False, False)])
def test_schema_versions_and_models_without_prototypes(tmp_path, version, prototypes, accepted):
    # What the trainer writes now is version 2, where the prototypes may be absent (docs/bundle.md).
    bundle = fixture_bundle("tiny-gray")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = version
    if not prototypes:
        manifest["outputs"]["prototype_scores"] = None
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    if accepted:
        assert grid.load_manifest(tmp_path)["schema_version"] == version
    else:
        with pytest.raises(SystemExit, match="schema_version 3" if prototypes else "no prototypes"):
            grid.load_manifest(tmp_path)


def test_truncated_idx_file_is_refused(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", grid.IDX_IMAGES, 5, 28, 28) + b"\0" * 100)
    with pytest.raises(SystemExit, match="header says"):
        grid.read_idx(path, grid.IDX_IMAGES)
