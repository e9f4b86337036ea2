"""A bundle read back into PyTorch (bundle_model.py) and exported again through `export BUNDLE_DIR`."""

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import make_images, tiny_config
from swav_train import export
from swav_train.bundle_model import initial_weights, model_from_bundle, recalibrate_batchnorms
from swav_train.cli import main
from swav_train.config import ConfigError
from swav_train.model import InferenceModel, SwAVModel
from swav_train.train import train


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


def assert_same_outputs(got_model: SwAVModel, want_model: SwAVModel, cfg, seed: int) -> None:
    batch = torch.from_numpy(np.random.default_rng(seed).random((5, 3, 16, 16), dtype=np.float32))
    with torch.no_grad():
        want = InferenceModel(want_model, cfg.mean, cfg.std).eval()(batch)
        got = InferenceModel(got_model, cfg.mean, cfg.std).eval()(batch)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), float((g - w).abs().max())


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
    assert_same_outputs(rebuilt, original, cfg, seed=1)


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


def test_export_from_a_bundle_with_the_embedding_from_another_stage(bundle, tmp_path):
    path, original, cfg = bundle
    assert main(["export", str(path), "--embedding-layer", "3", "--out", str(tmp_path / "s3")]) == 0
    manifest = json.loads((tmp_path / "s3" / "manifest.json").read_text())
    assert manifest["outputs"]["embedding"]["dim"] == 4 * cfg.width
    assert manifest["training"]["embedding_layer"] == 3
    assert manifest["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
    batch = np.random.default_rng(4).random((3, 3, 16, 16), dtype=np.float32)
    got, before = _run(tmp_path / "s3", batch), _run(path, batch)
    want = copy.deepcopy(original)
    want.embedding_layer = 3
    with torch.no_grad():
        emb = InferenceModel(want, cfg.mean, cfg.std).eval()(torch.from_numpy(batch))[0].numpy()
    assert got[0].shape == (3, 4 * cfg.width) and before[0].shape == (3, 8 * cfg.width)
    np.testing.assert_allclose(got[0], emb, atol=1e-5)
    for g, b in zip(got[1:], before[1:]):  # projection and prototype scores are unchanged
        np.testing.assert_allclose(g, b, atol=1e-5)
    rebuilt, rebuilt_cfg, _ = model_from_bundle(tmp_path / "s3")  # reads back, parity checked
    assert rebuilt_cfg.embedding_layer == 3 and rebuilt.embedding_layer == 3
    # and back to stage 4: the original bundle's outputs again
    assert main(["export", str(tmp_path / "s3"), "--embedding-layer", "4", "--out", str(tmp_path / "s4")]) == 0
    for g, b in zip(_run(tmp_path / "s4", batch), before):
        np.testing.assert_allclose(g, b, atol=1e-5)


def test_a_bundle_from_before_the_embedding_layer_reads_back_at_stage_4(bundle, tmp_path):
    path, original, cfg = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["training"]["embedding_layer"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    rebuilt, rebuilt_cfg, _ = model_from_bundle(path)
    assert rebuilt_cfg.embedding_layer == 4
    assert_same_outputs(rebuilt, original, cfg, seed=5)


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


@pytest.mark.parametrize(("bad", "said"), [
    ({"height": "16"}, "`input.height` must be an integer in 1..4096, not '16'"),
    ({"width": -1}, "`input.width` must be an integer in 1..4096, not -1"),
    ({"channels": None}, "`input.channels` must be an integer in 1..4096, not None"),
    ({"height": 10**9}, "`input.height` must be an integer in 1..4096"),
    ({"channels": 2}, "`input.channels` must be 1 or 3"),
    ({"resize": {"method": "shorter_side", "size": 8}}, "`input.resize.size` 8 is smaller than the 16x16 crop"),
    ({"resize": {"method": "longer_side", "size": 16}}, "`input.resize` must be"),
    ({"crop": None}, "`input.crop` must be"),
])
def test_a_bundle_with_a_bad_input_rule_is_refused_saying_why(bundle, tmp_path, capsys, bad, said):
    path, _, _ = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["input"].update(bad)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(path), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert f"{path}/manifest.json" in err and said in err, err


def _crops(seed: int, sizes=(16, 16, 8, 8), n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g) * 0.8 + 0.2 for s in sizes]


def test_recalibrated_batchnorms_keep_eval_mode_and_make_training_mode_agree(bundle):
    path, _, _ = bundle
    rebuilt, _, _ = model_from_bundle(path)
    batches = [_crops(s, n=32) for s in range(6)]
    probe = _crops(99, n=32)
    with torch.no_grad():
        before = rebuilt.eval()(probe)
        uncalibrated_train = copy.deepcopy(rebuilt).train()(probe)  # a training forward moves the statistics
    assert recalibrate_batchnorms(rebuilt, batches) == 6
    with torch.no_grad():
        after = rebuilt.eval()(probe)
        train_mode = rebuilt.train()(probe)
    for a, b in zip(after, before):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # Training mode normalises by the batch's own statistics; with the input's statistics restored
    # it now computes nearly what eval mode does. Identity BatchNorms made it a different network.
    calibrated_gap = float((train_mode[0] - before[0]).abs().mean())
    uncalibrated_gap = float((uncalibrated_train[0] - before[0]).abs().mean())
    assert calibrated_gap < 0.2 * uncalibrated_gap, (calibrated_gap, uncalibrated_gap)
    bn = next(m for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=1e-2)


def test_recalibration_needs_a_batch(bundle):
    rebuilt, _, _ = model_from_bundle(bundle[0])
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorms(rebuilt, [])


def test_a_run_starts_from_a_bundle_and_fine_tunes_it(bundle, tmp_path, image_folder):
    path, original, cfg = bundle
    run_cfg = cfg.replace(data_dir=str(image_folder), init_from=str(path), epochs=1, warmup_epochs=0,
                          base_lr=1e-9, final_lr=1e-9, freeze_prototypes_niters=0)
    weights = initial_weights(path, run_cfg, lambda: [_crops(0)])
    start = SwAVModel.from_config(run_cfg)
    start.load_state_dict(weights)
    assert_same_outputs(start, original, cfg, seed=4)
    # A whole run from the bundle through the CLI, at a learning rate too small to move the weights, ends
    # where it started (BatchNorm running statistics aside): the start really is the bundle's model.
    run_cfg.replace(init_from="").save(tmp_path / "config.json")
    assert main(["train", "--config", str(tmp_path / "config.json"), "--init-from", str(path),
                 "--out", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert torch.allclose(state["prototypes.weight"], torch.nn.functional.normalize(start.prototypes.weight, dim=1),
                          atol=1e-4)
    assert torch.allclose(state["backbone.conv1.weight"], start.backbone.conv1.weight, atol=1e-4)
    # The run's config records where it started, so that resuming it checks the same source.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["init_from"] == str(path)


def test_starting_from_a_checkpoint_takes_its_model(tmp_path, image_folder):
    cfg = tiny_config(data_dir=str(image_folder), epochs=1, warmup_epochs=0)
    train(cfg, tmp_path / "first", resume=False)
    saved = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=False)["model"]
    weights = initial_weights(tmp_path / "first" / "checkpoint.pt", cfg.replace(base_lr=0.5), lambda: [])
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


@pytest.mark.parametrize("change", [{"width": 4}, {"stem": "small-stride2"}, {"nmb_prototypes": 7},
                                    {"channels": 1, "mean": (0.5,), "std": (0.25,)}])
def test_a_start_whose_model_differs_is_refused_naming_the_field(bundle, change):
    path, _, cfg = bundle
    with pytest.raises(ConfigError, match=f"--init-from {path}: its model differs .*{next(iter(change))}"):
        initial_weights(path, cfg.replace(**change), lambda: [_crops(0)])


def test_init_from_a_missing_source_is_an_error_naming_it(tmp_path, image_folder, capsys):
    missing = tmp_path / "nothing.pt"
    code = main(["train", "--preset", "imagenet", "--out", str(tmp_path / "run"), "--data-dir", str(image_folder),
                 "--init-from", str(missing), "--no-evaluate", "--no-crash-guard", "--image-size", "16",
                 "--resize-size", "16", "--size-crops", "16", "8", "--arch", "resnet18", "--width", "2",
                 "--hidden-mlp", "16", "--feat-dim", "8", "--nmb-prototypes", "8", "--batch-size", "8",
                 "--num-workers", "0", "--epochs", "2", "--warmup-epochs", "0", "--no-progress"])
    assert code != 0
    assert str(missing) in capsys.readouterr().err
