"""A bundle written by this trainer, loaded back into a SwAVModel: for exporting it again when its
checkpoint is gone, for example at another input size.

The exporter folds every BatchNorm into the layer before it: a convolution keeps its folded weight
under `<conv>.weight` and gains a bias `<conv>.weight_bias`, and the projection head's first Linear
absorbs its BatchNorm1d. So the BatchNorms come back as identities that add the folded bias
(weight 1, running mean 0, running variance 1 - eps). Every weight of the graph must find its
parameter and every parameter its weight, and the rebuilt model must reproduce the bundle's outputs
(export.parity_check's tolerance), or loading fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swav_train.config import ConfigError, TrainConfig, from_dict
from swav_train.export import ExportError, parity_check
from swav_train.model import InferenceModel, SwAVModel

_PREFIX = "model."  # InferenceModel holds the SwAVModel as `model`
_FOLDED_BIAS = ".weight_bias"


def _conv_of(bn_name: str) -> str:
    """The layer a BatchNorm follows, by torchvision's ResNet naming (bn1 after conv1, downsample.1
    after downsample.0)."""
    if bn_name.endswith("downsample.1"):
        return bn_name[: -len("1")] + "0"
    head, _, last = bn_name.rpartition(".")
    if not last.startswith("bn"):
        raise ExportError(f"no rule for the layer before BatchNorm {bn_name}")
    return f"{head}.conv{last[2:]}" if head else f"conv{last[2:]}"


def _config(bundle_dir: Path, manifest: dict) -> TrainConfig:
    training = manifest.get("training")
    if not isinstance(training, dict):
        raise ExportError(f"{bundle_dir}/manifest.json has no `training` config: the bundle was not written "
                          "by `swav_train train` or `export` (an imported checkpoint? import it again instead)")
    try:
        return from_dict(training)
    except (ConfigError, TypeError) as e:
        raise ExportError(f"{bundle_dir}/manifest.json: its `training` config is not valid here: {e}") from None


def _graph_weights(model_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(model_path)).graph
    except Exception as e:  # protobuf's errors have no common base worth naming
        raise ExportError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    weights = {i.name[len(_PREFIX):]: numpy_helper.to_array(i).astype(np.float32)
               for i in graph.initializer if i.name.startswith(_PREFIX)}
    if "prototypes.weight" not in weights:
        # Small graphs get the normalised, transposed prototypes folded into one constant, the
        # right-hand side of the MatMul giving prototype_scores. Normalised is enough: the model
        # normalises them again.
        constants = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "MatMul" and list(node.output) == ["prototype_scores"] and node.input[1] in constants:
                weights["prototypes.weight"] = numpy_helper.to_array(constants[node.input[1]]).astype(np.float32).T
    return weights


def model_from_bundle(bundle_dir: str | Path) -> tuple[SwAVModel, TrainConfig, dict]:
    """(SwAVModel in eval mode on the CPU, its TrainConfig, the manifest) from
    BUNDLE_DIR/{manifest.json, model.onnx}."""
    bundle_dir = Path(bundle_dir)
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{bundle_dir}/manifest.json: cannot be read ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{bundle_dir}/manifest.json is not a JSON object")
    cfg = _config(bundle_dir, manifest)
    model_path = bundle_dir / str(manifest.get("model_file") or "model.onnx")
    weights = _graph_weights(model_path)
    model = SwAVModel.from_config(cfg).eval()
    state = model.state_dict()
    used: set[str] = set()

    def take(name: str, shape: torch.Size) -> torch.Tensor:
        if name not in weights:
            raise ExportError(f"{model_path}: has no weight {_PREFIX}{name}; the bundle does not match its "
                              "own training config")
        value = torch.from_numpy(weights[name])
        if value.shape != shape:
            raise ExportError(f"{model_path}: {_PREFIX}{name} has shape {tuple(value.shape)}, the config's "
                              f"model wants {tuple(shape)}")
        used.add(name)
        return value

    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, field = key.rpartition(".")
        module = modules[owner]
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            if field == "num_batches_tracked":
                continue
            if field == "bias":
                folded = isinstance(module, nn.BatchNorm2d)  # BatchNorm1d's bias went into the Linear's
                state[key] = take(f"{_conv_of(owner)}{_FOLDED_BIAS}", tensor.shape) if folded else torch.zeros_like(tensor)
            else:
                state[key] = {"weight": torch.ones_like(tensor), "running_mean": torch.zeros_like(tensor),
                              "running_var": torch.full_like(tensor, 1.0 - module.eps)}[field]
        else:
            state[key] = take(key, tensor.shape)
    left = sorted(set(weights) - used)
    if left:
        raise ExportError(f"{model_path}: weights {', '.join(left[:5])} have no place in the config's model")
    model.load_state_dict(state)
    wrapper = InferenceModel(model, cfg.mean, cfg.std).eval()
    inp = manifest.get("input")
    sides = [inp.get(k) if isinstance(inp, dict) else None for k in ("channels", "height", "width")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in sides):
        raise ExportError(f"{bundle_dir}/manifest.json: `input` needs channels, height and width as positive "
                          f"integers up to 4096, not {sides}")
    shape = (4, *(int(v) for v in sides if v is not None))
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    parity_check(wrapper, model_path, batch)  # raises above PARITY_TOLERANCE
    return model, cfg, manifest
