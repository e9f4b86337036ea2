"""The end of a run: the bundle is written before the evaluation, so a failed evaluation keeps it,
and a successful one is recorded in its manifest afterwards."""

from __future__ import annotations

import json

from conftest import make_images, tiny_config
from swav_train import cli, evaluate
from swav_train.data import DataError


def _config(tmp_path, fashion_mnist_dir):
    path = tmp_path / "tiny.json"
    tiny_config(data_dir=str(make_images(tmp_path / "images", 16)), epochs=1, warmup_epochs=0, evaluate=True,
                fashion_mnist_dir=str(fashion_mnist_dir)).save(path)
    return path


def test_a_failed_evaluation_keeps_the_trained_bundle(tmp_path, fashion_mnist_dir, monkeypatch, capsys, caplog):
    def fails(*args, **kwargs):
        raise DataError("the labelled set went away during training")

    monkeypatch.setattr(evaluate, "evaluate_torch", fails)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(_config(tmp_path, fashion_mnist_dir)), "--out", str(run)]) == 2
    assert "error: the labelled set went away" in capsys.readouterr().err
    assert any("is kept without one" in r.getMessage() for r in caplog.records)
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["evaluation"] is None and (run / "bundle" / "model.onnx").is_file()
    assert not (run / "eval.json").exists()


def test_the_evaluation_is_recorded_in_the_bundle_written_before_it(tmp_path, fashion_mnist_dir, monkeypatch):
    run = tmp_path / "run"
    seen = {}

    def measured(model, cfg, train_size=0, test_size=0, eval_set=None):
        seen["bundle"] = json.loads((run / "bundle" / "manifest.json").read_text())
        return {"linear_probe_top1": 0.5, "knn_top1": 0.25, "kmeans_embedding": {"nmi": 0.1, "ari": 0.0},
                "prototype_assignment": {"nmi": 0.2}, "train_size": 30, "test_size": 20, "seconds": 0.1}

    monkeypatch.setattr(evaluate, "evaluate_torch", measured)
    assert cli.main(["train", "--config", str(_config(tmp_path, fashion_mnist_dir)), "--out", str(run)]) == 0
    assert seen["bundle"]["evaluation"] is None  # the bundle existed when the evaluation began
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["evaluation"]["knn_top1"] == 0.25
    assert json.loads((run / "eval.json").read_text()) == manifest["evaluation"]
    # Only the evaluation changed: the model's digest and the rest stand.
    assert {k: v for k, v in manifest.items() if k != "evaluation"} == \
        {k: v for k, v in seen["bundle"].items() if k != "evaluation"}
