import logging

import numpy as np
import pytest
from PIL import Image

from conftest import make_images, tiny_config
from swav_train import cli
from swav_train.augment import MultiCrop
from swav_train.data import DataError, ImageFolderDataset, load_fashion_mnist, scan_folder


def _run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_missing_folder_is_a_clear_cli_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, err = _run_cli(["train", "--out", str(tmp_path / "run"), "--data-dir", str(missing)], capsys)
    assert code == 2
    assert f"data folder {missing} does not exist" in err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, err = _run_cli(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty")], capsys)
    assert code == 2
    assert "no readable images found in" in err and str(tmp_path / "empty") in err


def test_folder_of_only_corrupt_files_names_one(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path / "d")
    assert "broken.png" in str(e.value) and "could not be read" in str(e.value)


def test_corrupt_files_are_reported_and_skipped(tmp_path, caplog):
    root = make_images(tmp_path / "imgs", 6)
    (root / "bad.jpg").write_bytes(b"definitely not a jpeg")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    good.save(root / "trunc.png")
    data = (root / "trunc.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, channels=3, transform=MultiCrop(tiny_config()))
    assert any("bad.jpg" in r.getMessage() and "skipping unreadable image" in r.getMessage() for r in caplog.records)
    assert [p.name for p, _ in ds.skipped] == ["bad.jpg"]
    assert len(ds) == 7  # six good + the truncated one, which only fails on decode
    trunc_index = [p.name for p in ds.paths].index("trunc.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        crops = ds[trunc_index]  # replaced by the next readable image, not a crash
    assert len(crops) == 4
    assert any("trunc.png" in r.getMessage() for r in caplog.records)


def test_fashion_mnist_idx(fashion_mnist_dir, tmp_path):
    images, labels = load_fashion_mnist(fashion_mnist_dir, "t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist(tmp_path / "none", "train")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="t10k-images"):
        load_fashion_mnist(tmp_path, "t10k")


def test_grayscale_multicrop_keeps_one_channel():
    cfg = tiny_config(channels=1, mean=(0.5,), std=(0.25,))
    crops = MultiCrop(cfg)(Image.fromarray(np.full((28, 28), 100, np.uint8)))
    assert [tuple(c.shape) for c in crops] == [(1, 16, 16), (1, 16, 16), (1, 8, 8), (1, 8, 8)]


def test_missing_evaluation_set_fails_before_training(tmp_path, capsys):
    folder = make_images(tmp_path / "imgs", 8)
    code, err = _run_cli(["train", "--out", str(tmp_path / "run"), "--data-dir", str(folder),
                          "--fashion-mnist-dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert "nowhere" in err and "--no-evaluate" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_eval_set_check_covers_both_fashion_mnist_splits(tmp_path, fashion_mnist_dir):
    from swav_train.evaluate import EvalSet

    def only(split_prefix):
        d = tmp_path / split_prefix
        d.mkdir()
        for f in fashion_mnist_dir.iterdir():
            if f.name.startswith(split_prefix):
                (d / f.name).symlink_to(f)
        return d

    EvalSet(fashion_mnist_dir=str(fashion_mnist_dir)).check()
    # Only the test split: the reference images the probe and kNN train on are missing.
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        EvalSet(fashion_mnist_dir=str(only("t10k"))).check()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        EvalSet(fashion_mnist_dir=str(only("train"))).check()
