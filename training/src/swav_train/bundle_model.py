"""A bundle written by this trainer, loaded back into a SwAVModel: for exporting it again when its
checkpoint is gone, for example at another input size, and for starting a run from it (`--init-from`).

The exporter folds every BatchNorm into the layer before it: a convolution keeps its folded weight
under `<conv>.weight` and gains a bias `<conv>.weight_bias`, and the projection head's first Linear
absorbs its BatchNorm1d. So the BatchNorms come back as identities that add the folded bias
(weight 1, running mean 0, running variance 1 - eps). Every weight of the graph must find its
parameter and every parameter its weight, and the rebuilt model must reproduce the bundle's outputs
(export.parity_check's tolerance), or loading fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swav_train.config import ConfigError, TrainConfig, from_dict
from swav_train.export import ExportError, parity_check
from swav_train.model import InferenceModel, SwAVModel
from swav_train.preprocess import InputSpec

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
    try:
        spec = InputSpec.from_manifest(manifest.get("input"))
    except ValueError as e:
        raise ExportError(f"{bundle_dir}/manifest.json: {e}") from None
    shape = (4, spec.channels, spec.height, spec.width)
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    parity_check(wrapper, model_path, batch)  # raises above PARITY_TOLERANCE
    return model, cfg, manifest


# What fixes a model's layers and how its input reaches them: a start must agree on all of these.
_ARCHITECTURE = ("arch", "width", "channels", "small_stem", "stem_stride", "hidden_mlp", "feat_dim", "nmb_prototypes")


def check_same_architecture(source_cfg: TrainConfig, cfg: TrainConfig, source: Path) -> None:
    diffs = [f"{k} {getattr(source_cfg, k)} (here {getattr(cfg, k)})" for k in _ARCHITECTURE
             if getattr(source_cfg, k) != getattr(cfg, k)]
    if diffs:
        raise ConfigError(f"--init-from {source}: its model differs from this config's in {', '.join(diffs)}")


@torch.no_grad()
def recalibrate_batchnorms(model: nn.Module, batches: Iterable[list[torch.Tensor]]) -> int:
    """Give every BatchNorm the statistics of its input over `batches` (lists of crops, as training
    feeds them), changing its weight and bias so that eval mode computes exactly what it did.

    A model rebuilt from a bundle has identity BatchNorms in front of folded weights: right in eval
    mode, but in training mode each would normalise its input to unit variance, a different network.
    With the input's own mean m and variance v as running statistics, weight w*sqrt(v+eps)/sqrt(rv+eps)
    and bias b + w*(m-rm)/sqrt(rv+eps), eval mode is unchanged and training mode, normalising by
    batch statistics near (m, v), starts out computing the same. Returns the number of batches seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    sums: dict[int, list[torch.Tensor | float]] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        acc = sums.setdefault(id(module), [0.0, 0.0, 0.0])
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] = float(acc[2]) + x.numel() / x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for crops in batches:
            model(crops)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrate_batchnorms needs at least one batch")
    for m in norms:
        running_mean, running_var = m.running_mean, m.running_var
        if running_mean is None or running_var is None or id(m) not in sums:
            continue  # no statistics to restore, or a layer the forward pass never reached
        total, total_sq, count = sums[id(m)]
        mean = torch.as_tensor(total) / count
        var = (torch.as_tensor(total_sq) / count - mean * mean).clamp_min(0.0)
        old_scale = m.weight / torch.sqrt(running_var + m.eps)
        m.bias.add_(old_scale * (mean - running_mean))
        m.weight.copy_(old_scale * torch.sqrt(var + m.eps))
        running_mean.copy_(mean)
        running_var.copy_(var)
    return seen


def initial_weights(source: str | Path, cfg: TrainConfig,
                    calibration: Callable[[], Iterable[list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The state dict a fine-tuning run starts from: a checkpoint.pt's model, or a bundle's weights
    with their BatchNorms recalibrated on `calibration()`'s crops. The source's model config must
    match `cfg`'s (ConfigError naming the fields that differ)."""
    from swav_train import checkpoint

    source = Path(source)
    if source.is_dir():
        model, source_cfg, _ = model_from_bundle(source)
        check_same_architecture(source_cfg, cfg, source)
        recalibrate_batchnorms(model, calibration())
        return model.state_dict()
    state = checkpoint.load(source, required=("model", "config"))
    try:
        source_cfg = from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"--init-from {source}: its config is not valid here: {e}") from None
    check_same_architecture(source_cfg, cfg, source)
    return state["model"]
