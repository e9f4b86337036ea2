"""A bundle read back into PyTorch (bundle_model.py) and exported again through `export BUNDLE_DIR`."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import make_images, tiny_config
from swav_train import export
from swav_train.bundle_model import model_from_bundle
from swav_train.cli import main
from swav_train.model import InferenceModel, SwAVModel


def _trained_looking_model(cfg) -> SwAVModel:
    """Random weights *and* BatchNorm statistics: with the fresh ones (mean 0, var 1, weight 1,
    bias 0) folding them is the identity and a wrong unfolding would go unseen."""
    torch.manual_seed(0)
    model = SwAVModel.from_config(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _run(bundle, batch):
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(list(export.OUTPUT_NAMES), {"images": batch})


@pytest.fixture
def bundle(tmp_path):
    cfg = tiny_config(stem="auto", image_size=16, resize_size=16)
    model = _trained_looking_model(cfg)
    export.export_bundle(model, cfg, tmp_path / "a")
    return tmp_path / "a", model, cfg


def test_the_rebuilt_model_computes_what_the_bundle_does(bundle):
    path, original, cfg = bundle
    rebuilt, rebuilt_cfg, _ = model_from_bundle(path)
    assert rebuilt_cfg == cfg
    batch = torch.from_numpy(np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32))
    with torch.no_grad():
        want = InferenceModel(original, cfg.mean, cfg.std).eval()(batch)
        got = InferenceModel(rebuilt, cfg.mean, cfg.std).eval()(batch)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), float((g - w).abs().max())


def test_export_from_a_bundle_at_its_own_size_gives_the_same_outputs(bundle, tmp_path):
    path, _, _ = bundle
    assert main(["export", str(path), "--out", str(tmp_path / "b")]) == 0
    batch = np.random.default_rng(2).random((4, 3, 16, 16), dtype=np.float32)
    for g, w in zip(_run(tmp_path / "b", batch), _run(path, batch)):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_export_from_a_bundle_at_another_size(bundle, tmp_path):
    path, _, _ = bundle
    golden = make_images(tmp_path / "golden-src", 2, size=(30, 26))
    files = sorted(str(p) for p in golden.rglob("*.png"))
    assert main(["export", str(path), "--image-size", "24", "--out", str(tmp_path / "c"), "--golden", *files]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (manifest["input"]["height"], manifest["input"]["width"], manifest["input"]["resize"]["size"],
            manifest["input"]["crop"]["height"]) == (24, 24, 24, 24)
    assert (manifest["training"]["image_size"], manifest["training"]["resize_size"]) == (24, 24)
    # 'auto' chose the small stem at 16 px; the record names it, so that the config still builds this model
    assert manifest["training"]["stem"] == "small"
    assert manifest["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
    outputs = _run(tmp_path / "c", np.random.default_rng(3).random((2, 3, 24, 24), dtype=np.float32))
    assert [o.shape for o in outputs] == [(2, 16), (2, 8), (2, 6)]
    cases = json.loads((tmp_path / "c" / "golden" / "golden.json").read_text())["cases"]
    assert len(cases) == 2 and all(len(c["tensor"]) == 3 * 24 * 24 for c in cases)
    assert manifest["dataset"] == json.loads((path / "manifest.json").read_text())["dataset"]
    model_from_bundle(tmp_path / "c")  # and the new bundle reads back in turn


def test_resize_size_alone_keeps_the_input_size(bundle, tmp_path):
    path, _, _ = bundle
    assert main(["export", str(path), "--resize-size", "20", "--out", str(tmp_path / "d")]) == 0
    inp = json.loads((tmp_path / "d" / "manifest.json").read_text())["input"]
    assert (inp["height"], inp["resize"]["size"]) == (16, 20)


def test_a_size_the_config_refuses_is_an_error_naming_the_field(bundle, tmp_path, capsys):
    path, _, _ = bundle
    assert main(["export", str(path), "--image-size", "24", "--resize-size", "20", "--out", str(tmp_path / "e")]) == 2
    assert "resize_size" in capsys.readouterr().err
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_a_bundle_without_its_training_config_is_refused(bundle, tmp_path, capsys):
    path, _, _ = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["training"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(path), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "`training`" in err


def test_a_bundle_whose_config_does_not_fit_its_weights_is_refused(bundle, tmp_path, capsys):
    path, _, _ = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["training"]["width"] = 4  # the graph holds a width-2 model
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(path), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "shape" in err


def test_a_bundle_with_a_broken_graph_is_refused(bundle, tmp_path, capsys):
    path, _, _ = bundle
    (path / "model.onnx").write_bytes(b"not a protobuf at all")
    assert main(["export", str(path), "--out", str(tmp_path / "h")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"height": "16"}, {"width": -1}, {"channels": None}, {"height": 10**9}])
def test_a_bundle_with_a_bad_input_size_is_refused(bundle, tmp_path, capsys, bad):
    path, _, _ = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["input"].update(bad)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(path), "--out", str(tmp_path / "i")]) == 2
    assert "`input` needs channels, height and width" in capsys.readouterr().err
