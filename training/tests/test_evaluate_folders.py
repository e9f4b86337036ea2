"""Evaluation on labelled image folders (ROOT/<class>/<image>) instead of Fashion-MNIST."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, tiny_config
from swav_train import cli, evaluate, preprocess
from swav_train.config import ConfigError, TrainConfig
from swav_train.data import DataError, scan_labelled_folder
from swav_train.evaluate import EvalSet
from swav_train.model import SwAVModel
from swav_train.preprocess import InputSpec

# Listed unsorted on purpose: label ids follow the sorted names.
COLOURS = {"red": 0, "green": 1, "blue": 2}
SPEC = InputSpec(channels=3, resize_size=16, height=16, width=16)
METRIC_KEYS = {"dataset", "classes", "train_size", "test_size", "skipped_unreadable", "linear_probe_top1", "knn_top1",
               "knn", "kmeans_embedding", "prototype_assignment", "projection", "seconds"}


def make_labelled(root: Path, per_class: int, seed: int = 0, classes=tuple(COLOURS)) -> Path:
    """One folder per colour: noise with that colour's channel raised, of varying sizes
    (so the resize and centre crop of the bundle rule are exercised)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(24, 40, size=2)
            arr = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
            arr[..., COLOURS.get(name, 0)] += 150
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    return make_labelled(tmp_path / "train", 20, seed=1), make_labelled(tmp_path / "test", 10, seed=2)


def raw_pixels(record: list | None = None) -> evaluate.Encoder:
    """Pixels as the embedding and per-channel means as prototype scores: a trivially good encoder."""
    def encode(batch: np.ndarray):
        if record is not None:
            record.append(batch.copy())
        flat = batch.reshape(len(batch), -1)
        return flat, flat, batch.mean(axis=(2, 3))
    return encode


def _in_range(ev: dict) -> None:
    assert set(ev) == METRIC_KEYS
    for name in ("linear_probe_top1", "knn_top1"):
        assert 0 <= ev[name] <= 1, name
    for part in (ev["kmeans_embedding"], ev["prototype_assignment"], ev["projection"]["kmeans"]):
        assert 0 <= part["nmi"] <= 1 and -1 <= part["ari"] <= 1, part
    assert 0 <= ev["projection"]["knn_top1"] <= 1
    assign = ev["prototype_assignment"]
    assert assign["temperature"] == 0.1 and 0 <= assign["top_probability_above_half"] <= 1
    assert all(0 < p <= 1 for p in assign["largest_prototypes"]["purity"])
    assert ev["knn"] == {"k": 20, "temperature": 0.07, "metric": "cosine"}


def test_separable_folders_score_high_through_the_bundle_rule(folders):
    train, test = folders
    batches = []
    ev = evaluate.evaluate_encoder(raw_pixels(batches), SPEC, EvalSet(train_dir=str(train), test_dir=str(test)))
    _in_range(ev)
    assert ev["dataset"] == f"folders:{train.resolve()}|{test.resolve()}"
    assert ev["classes"] == ["blue", "green", "red"]
    assert (ev["train_size"], ev["test_size"], ev["skipped_unreadable"]) == (60, 30, 0)
    assert ev["knn_top1"] >= 0.9 and ev["linear_probe_top1"] >= 0.9
    assert ev["kmeans_embedding"]["nmi"] >= 0.9
    assert ev["prototype_assignment"]["nmi"] >= 0.99 and ev["prototype_assignment"]["prototypes_used"] == 3
    assert ev["prototype_assignment"]["largest_prototypes"]["mean_purity"] >= 0.99
    assert ev["projection"]["knn_top1"] >= 0.9
    # Every image went through the bundle preprocessing rule, file to tensor, in folder order.
    paths = scan_labelled_folder(train).paths + scan_labelled_folder(test).paths
    np.testing.assert_array_equal(np.concatenate(batches), np.stack([preprocess.load_array(p, SPEC) for p in paths]))


def test_untrained_model_on_folders_gives_every_metric_in_range(folders):
    train, test = folders
    cfg = tiny_config(eval_train_dir=str(train), eval_test_dir=str(test))
    torch.manual_seed(0)
    ev = evaluate.evaluate_torch(SwAVModel.from_config(cfg), cfg, train_size=45)
    _in_range(ev)
    assert (ev["train_size"], ev["test_size"]) == (45, 30)
    assert 1 <= ev["prototype_assignment"]["prototypes_used"] <= cfg.nmb_prototypes


def test_train_eval_and_export_use_the_folders(tmp_path, folders):
    train, test = folders
    run = tmp_path / "run"
    cfg_path = tmp_path / "tiny.json"
    tiny_config(data_dir=str(make_images(tmp_path / "unlabelled", 16)), epochs=1, warmup_epochs=0).save(cfg_path)
    flags = ["--eval-train-dir", str(train), "--eval-test-dir", str(test)]
    assert cli.main(["train", "--config", str(cfg_path), "--out", str(run), "--evaluate", *flags]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["dataset"].startswith("folders:") and ev["classes"] == ["blue", "green", "red"]
    assert json.loads((run / "bundle" / "manifest.json").read_text())["evaluation"] == ev

    # The bundle remembers its labelled folders; eval through onnxruntime agrees with PyTorch.
    assert cli.main(["eval", str(run / "bundle"), "--out", str(tmp_path / "bundle_eval.json")]) == 0
    bundle_ev = json.loads((tmp_path / "bundle_eval.json").read_text())
    assert bundle_ev["dataset"] == ev["dataset"] and abs(bundle_ev["knn_top1"] - ev["knn_top1"]) <= 0.04

    # Command-line folders override the recorded ones (here: the two splits swapped).
    out = tmp_path / "exported"
    assert cli.main(["export", str(run / "checkpoint.pt"), "--out", str(out), "--evaluate",
                     "--eval-train-dir", str(test), "--eval-test-dir", str(train)]) == 0
    exported = json.loads((out / "manifest.json").read_text())["evaluation"]
    assert exported["dataset"] == f"folders:{test.resolve()}|{train.resolve()}"
    assert (exported["train_size"], exported["test_size"]) == (30, 60)


def test_mismatched_classes_are_named_before_training(tmp_path, capsys):
    train = make_labelled(tmp_path / "train", 3, classes=("red", "green", "cyan"))
    test = make_labelled(tmp_path / "test", 3, classes=("red", "green", "blue"))
    with pytest.raises(DataError) as e:
        EvalSet(train_dir=str(train), test_dir=str(test)).check()
    assert f"missing from {test}: cyan" in str(e.value) and f"missing from {train}: blue" in str(e.value)

    images = make_images(tmp_path / "unlabelled", 8)
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(images),
                     "--eval-train-dir", str(train), "--eval-test-dir", str(test)])
    err = capsys.readouterr().err
    assert code == 2 and "cyan" in err and "blue" in err and "--no-evaluate" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("layout,message", [
    ("missing", "labelled folder {root} does not exist"),
    ("empty", "no readable images found in {root}"),
    ("one_class", "needs at least 2 class subfolders"),
    ("empty_class", "class folder(s) of {root} without readable images: blue"),
])
def test_unusable_labelled_folder_is_a_clear_error(tmp_path, layout, message):
    good = make_labelled(tmp_path / "good", 2)
    root = tmp_path / "bad"
    if layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        make_labelled(root, 2, classes=("red",))
    elif layout == "empty_class":
        make_labelled(root, 2)
        for f in (root / "blue").iterdir():
            f.unlink()
    with pytest.raises(DataError) as e:
        evaluate.evaluate_encoder(raw_pixels(), SPEC, EvalSet(train_dir=str(good), test_dir=str(root)))
    assert message.format(root=root) in str(e.value)


def test_one_folder_without_the_other_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="eval_test_dir"):
        TrainConfig(eval_train_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--eval-train-dir"):
        EvalSet().override(test_dir=str(tmp_path))
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path),
                     "--eval-train-dir", str(tmp_path)])
    assert code == 2 and "eval_test_dir" in capsys.readouterr().err


def test_unreadable_images_are_reported_and_skipped(folders, caplog):
    train, test = folders
    (train / "red" / "bad.jpg").write_bytes(b"not a jpeg at all")  # fails on the header
    data = (train / "blue" / "000.png").read_bytes()
    (train / "blue" / "trunc.png").write_bytes(data[: len(data) // 2])  # fails only on decode
    (train / "loose.png").write_bytes(data)  # in no class folder
    with caplog.at_level(logging.WARNING):
        ev = evaluate.evaluate_encoder(raw_pixels(), SPEC, EvalSet(train_dir=str(train), test_dir=str(test)))
    messages = [r.getMessage() for r in caplog.records]
    for name in ("bad.jpg", "trunc.png"):
        assert any(name in m and "skipping unreadable image" in m for m in messages), name
    assert any("loose.png" in m and "outside its class folders" in m for m in messages)
    assert ev["skipped_unreadable"] == 2 and ev["train_size"] == 60
    assert ev["knn_top1"] >= 0.9  # the labels stayed aligned with the images that were kept


def test_help_documents_the_folder_flags(capsys):
    for command in ("train", "export", "eval"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "--eval-train-dir" in text and "--eval-test-dir" in text and "ROOT/<class>/<image>" in text, command


def test_assignment_scores_report_confidence_and_purity():
    # 4 images: prototype 0 takes three (labels 1, 1, 2), prototype 1 takes one (label 0).
    scores = np.array([[1.0, 0.0], [0.9, 0.8], [0.5, 0.0], [0.0, 0.3]])
    labels = np.array([1, 1, 2, 0])
    got = evaluate.assignment_scores(scores, labels, temperature=0.1)
    # softmax(s / 0.1) top probabilities: 0.99995, 0.731, 0.9933, 0.9526 -> all above 0.5
    assert got["top_probability_above_half"] == 1.0
    assert got["largest_prototypes"]["sizes"] == [3, 1]
    assert got["largest_prototypes"]["purity"] == [round(2 / 3, 4), 1.0]
    three = np.array([[1.0, 0.0, 0.0], [0.05, 0.0, 0.04]])  # the second is near-uniform over 3 at T = 0.1
    assert evaluate.assignment_scores(three, np.array([0, 1]), temperature=0.1)["top_probability_above_half"] == 0.5
    assert evaluate.assignment_scores(three, np.array([0, 1]), temperature=10.0)["top_probability_above_half"] == 0.0


def test_knn_and_linear_probe_measure_how_embeddings_separate_labels():
    from swav_train.evaluate import knn_accuracy, linear_probe_accuracy

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))

    def split(n):
        y = rng.integers(0, 5, n)
        return centres[y] + 0.3 * rng.normal(size=(n, 16)), y

    (train_x, train_y), (test_x, test_y) = split(200), split(100)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    # The same embeddings with the labels shuffled: chance (0.2 for 5 classes), give or take.
    shuffled = rng.permutation(train_y)
    assert knn_accuracy(train_x, shuffled, test_x, test_y) < 0.4
    assert linear_probe_accuracy(train_x, shuffled, test_x, test_y) < 0.4
