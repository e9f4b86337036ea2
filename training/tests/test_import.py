"""`swav_train import`: released SwAV checkpoints, built here with random weights in each exact layout
(no real checkpoint can be downloaded), read strictly and exported as bundles."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from conftest import make_images
from swav_train import checkpoint, cli, export
from swav_train.importers import CheckpointError, build_model, layouts, synthetic

SMALL = dict(resize=72, crop=64)  # the import allows any size; parity runs fast at 64 px


def official_state(**kw) -> dict[str, torch.Tensor]:
    """The released layout at test scale: width 8, hidden 32, 16-d projection, 20 prototypes."""
    return synthetic.official_state(**{"width": 8, "hidden": 32, "feat": 16, "k": 20, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    flat = official_state()
    out = {"flat": root / "swav_800ep_pretrain.pth.tar", "wrapped": root / "checkpoint.pth.tar",
           "backbone": root / "backbone.pth", "w2": root / "swav_RN50w2_400ep_pretrain.pth.tar"}
    torch.save(flat, out["flat"])
    torch.save({"epoch": 800, "state_dict": flat, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "amp": {"loss_scaler0": {"loss_scale": 1024.0, "unskipped": 0}}}, out["wrapped"])
    # The hub entry's model: torchvision names, no 'module.', no head, and a random classifier.
    backbone = {k[len("module."):]: v for k, v in official_state(head=False, seed=1).items()}
    backbone.update({"fc.weight": torch.randn(10, 256), "fc.bias": torch.zeros(10)})
    torch.save(backbone, out["backbone"])
    torch.save(official_state(width=16, widen=2, hidden=64, seed=2), out["w2"])
    return out


def errors_of(state: dict, tmp_path: Path) -> str:
    path = tmp_path / "bad.pth.tar"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        layouts.detect(checkpoint.read(path), path)
    return str(info.value)


# ---- layouts: no export, fast ------------------------------------------------------------------

def test_flat_and_wrapped_files_are_recognised_and_give_the_same_model(files):
    flat = layouts.detect(checkpoint.read(files["flat"]), files["flat"])
    wrapped = layouts.detect(checkpoint.read(files["wrapped"]), files["wrapped"])
    assert (flat.format, wrapped.format) == ("official", "official-checkpoint")
    assert flat.left_out == {}
    assert set(wrapped.left_out) == {"epoch", "optimizer", "amp"} and wrapped.metadata == {"epoch": 800}
    assert (flat.width, flat.base_width, flat.hidden, flat.feat_dim, tuple(flat.prototypes.shape)) == (8, 64, 32, 16, (20, 16))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = build_model(flat)(x), build_model(wrapped)(x)
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_width_2_file_gives_its_widths_from_the_shapes(files):
    w2 = layouts.detect(checkpoint.read(files["w2"]), files["w2"])
    assert (w2.width, w2.base_width, w2.hidden) == (16, 128, 64)
    model = build_model(w2)
    assert model.trunk.out_dim == 16 * 32 and model.trunk.layer1[0].conv1.out_channels == 32  # planes * widen
    # At full scale the same rule names the paper's model, and --arch checks it.
    full = layouts.Layout("official", "", {}, {}, None, width=128, base_width=128)
    from swav_train.importers import _arch_name
    assert _arch_name(full) == "resnet50w2"
    with pytest.raises(CheckpointError, match=r"'conv1.weight' has 16 output channels, ResNet-50-w2 has 128"):
        layouts.check_widen(w2, 2)


def test_torchvision_resnet50_at_full_size_is_a_backbone_with_the_same_features(tmp_path):
    tv = torchvision.models.resnet50(weights=None).eval()
    state = synthetic.randomised(tv)
    path = tmp_path / "hub.pth"
    torch.save(state, path)
    layout = layouts.detect(checkpoint.read(path), path)
    assert layout.format == "torchvision-backbone" and layout.prototypes is None and not layout.head
    assert set(layout.left_out) == {"fc.weight", "fc.bias"} and "random" in layout.left_out["fc.weight"]
    assert (layout.width, layout.base_width) == (64, 64)
    model = build_model(layout)
    assert model.output_names == ("embedding",)
    tv.load_state_dict(state)
    tv.fc = nn.Identity()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.trunk((x - model.mean) / model.std)
        theirs = tv((x - model.mean) / model.std)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_unexpected_missing_and_misshapen_keys_are_named(tmp_path):
    state = official_state()
    state["module.extra.weight"] = torch.zeros(1)
    del state["module.layer3.2.bn2.running_var"]
    state["module.layer2.0.conv2.weight"] = torch.zeros(16, 8, 3, 3)
    state["module.layer3.6.conv1.weight"] = torch.zeros(1)
    msg = errors_of(state, tmp_path)
    assert "unexpected key 'extra.weight'" in msg
    assert "missing key 'layer3.2.bn2.running_var'" in msg
    assert "wrong shape for 'layer2.0.conv2.weight': the file has [16, 8, 3, 3]" in msg
    assert "unexpected key 'layer3.6.conv1.weight' (ResNet-50 has 6 blocks in layer3" in msg


@pytest.mark.parametrize(("change", "needle"), [
    (lambda s: s.update({"module.prototypes.weight": torch.zeros(20, 15)}), "wrong shape for 'prototypes.weight'"),
    (lambda s: s.pop("module.projection_head.3.bias"), "missing key 'projection_head.3.bias'"),
    (lambda s: s.update({"conv1.weight": s.pop("module.conv1.weight")}), "key 'conv1.weight' lacks the 'module.' prefix"),
    (lambda s: s.update({"module.prototypes.prototypes1.weight": torch.zeros(3, 16)}), "several prototype heads"),
    (lambda s: s.update({"module.conv1.weight": torch.zeros(8, 1, 7, 7)}), "wrong shape for 'conv1.weight'"),
    (lambda s: s.update({"module.fc.weight": torch.zeros(3, 256)}), "unexpected key 'fc.weight'"),
])
def test_each_kind_of_mismatch_is_an_error_naming_the_key(tmp_path, change, needle):
    state = official_state()
    change(state)
    assert needle in errors_of(state, tmp_path)


def test_batchnorm_counters_may_be_absent(tmp_path):
    state = {k: v for k, v in official_state().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth.tar"
    torch.save(state, path)
    assert layouts.detect(checkpoint.read(path), path).format == "official"


def test_other_projects_files_and_unsafe_pickles_are_refused(tmp_path):
    assert "VISSL" in errors_of({"classy_state_dict": {"base_model": {}}}, tmp_path)
    assert "MMSelfSup" in errors_of({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}, "meta": {}}, tmp_path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Path("/tmp")}))  # any class beyond tensors and containers
    with pytest.raises(CheckpointError, match="weights_only=True"):
        checkpoint.read(evil)
    assert "does not hold a tensor" in errors_of({"module.conv1.weight": "not a tensor"}, tmp_path)


# ---- exports ---------------------------------------------------------------------------------

def run_import(*args) -> int:
    return cli.main(["import", *map(str, args)])


def ort_outputs(bundle: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": batch})))


def test_flat_file_imports_with_the_official_preprocessing_and_parity(files, tmp_path, capsys):
    out = tmp_path / "b"
    assert run_import(files["flat"], "--out", out) == 0
    printed = capsys.readouterr().out
    assert "found: official SwAV release (flat state_dict, 'module.' keys)" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == export.SCHEMA_VERSION == 2
    assert manifest["model_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert manifest["model_data"] is None
    src = manifest["source"]
    assert src["sha256"] == hashlib.sha256(files["flat"].read_bytes()).hexdigest() and src["format"] == "official"
    inp = manifest["input"]
    assert inp["resize"]["size"] == 256 and (inp["height"], inp["width"]) == (224, 224) and inp["channels"] == 3
    assert inp["mean"] == [0.485, 0.456, 0.406] and inp["std"] == [0.228, 0.224, 0.225]
    assert {k: (v or {}).get("dim") for k, v in manifest["outputs"].items()} == \
        {"embedding": 256, "projection": 16, "prototype_scores": 20, "centroid_scores": None}
    assert manifest["num_prototypes"] == 20 and manifest["parity"]["max_abs_diff"] <= 1e-4
    model = build_model(layouts.detect(checkpoint.read(files["flat"]), files["flat"]))
    batch = np.random.default_rng(5).random((3, 3, 224, 224), dtype=np.float32)
    got = ort_outputs(out, batch)
    with torch.no_grad():
        want = dict(zip(model.output_names, (t.numpy() for t in model(torch.from_numpy(batch)))))
    assert set(got) == {"embedding", "projection", "prototype_scores"}
    for name in got:
        assert float(np.abs(got[name] - want[name]).max()) <= 1e-4, name


def test_backbone_with_kmeans_centroids_in_external_data(files, tmp_path, capsys):
    images = make_images(tmp_path / "photos", 12, size=(90, 70))
    out = tmp_path / "b"
    assert run_import(files["backbone"], "--out", out, "--cluster-images", images, "--clusters", 3,
                      "--external-data", "always", *[f"--{k}={v}" for k, v in SMALL.items()]) == 0
    printed = capsys.readouterr().out
    assert "found: torchvision ResNet-50 backbone" in printed and "left out: fc.weight" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    data = manifest["model_data"]
    assert data["file"] == "model.onnx.data" and data["bytes"] == (out / "model.onnx.data").stat().st_size
    assert data["sha256"] == hashlib.sha256((out / "model.onnx.data").read_bytes()).hexdigest()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [t for t in graph.graph.initializer if np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert manifest["outputs"]["projection"] is None and manifest["outputs"]["prototype_scores"] is None
    assert manifest["outputs"]["centroid_scores"]["dim"] == 3 and manifest["num_prototypes"] == 0
    assert manifest["clusters"]["num_images"] == 12
    batch = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    got = ort_outputs(out, batch)
    assert set(got) == {"embedding", "centroid_scores"}
    # The centroid scores are cosines of the embedding to unit centroids.
    assert np.all(np.abs(got["centroid_scores"]) <= 1 + 1e-5)
    assert np.allclose(np.linalg.norm(got["embedding"], axis=1), 1, atol=1e-5)
    assert run_import(files["flat"], "--out", tmp_path / "c", "--cluster-images", images, "--clusters", 3) == 2
    assert "the checkpoint has prototypes" in capsys.readouterr().err


def test_width_2_in_fp16_halves_the_file_and_stays_within_cosine(files, tmp_path):
    out = tmp_path / "b"
    assert run_import(files["w2"], "--out", out, "--fp16", *[f"--{k}={v}" for k, v in SMALL.items()]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["fp16"] is True and manifest["parity"]["fp16_min_cosine"] >= 0.999
    layout = layouts.detect(checkpoint.read(files["w2"]), files["w2"])
    fp32_bytes = sum(v.numel() * 4 for k, v in layout.trunk.items() if v.is_floating_point())
    assert (out / "model.onnx").stat().st_size < 0.6 * fp32_bytes
    model = build_model(layout)
    batch = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    got = ort_outputs(out, batch)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(batch))]
    assert export.min_row_cosine([got[n] for n in model.output_names], want) >= 0.999
    assert manifest["outputs"]["embedding"]["dim"] == 512
