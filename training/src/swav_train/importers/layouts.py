"""Released checkpoint files (read by `checkpoint.read`, weights only): recognising their layout, and
mapping every key strictly onto a ResNet-50 trunk, the SwAV projection head and the prototypes.

Layouts (read from facebookresearch/swav: hubconf.py, main_swav.py, src/resnet50.py):

- official: a flat state_dict whose keys all start with `module.` (DistributedDataParallel). The trunk
  has torchvision's ResNet-50 names without `fc`; `projection_head.0` is Linear(E, hidden), `.1`
  BatchNorm1d(hidden), `.3` Linear(hidden, 128); `prototypes.weight` is [K, 128] without bias. The wide
  variants (RN50-w2/w4/w5) have the same names with a widened stem and stages: `widen` multiplies both
  the stage width and torchvision's `width_per_group`, so a bottleneck's inner width is planes * widen.
- official training checkpoint: the same dict under `state_dict`, next to `epoch`, `optimizer` and,
  with mixed precision, `amp`.
- torchvision backbone: what the torch.hub `resnet50` entry holds: torchvision names, no head, no
  prototypes, and a randomly initialised classifier `fc` (the hub docstring says so) that is reported
  and left out.

VISSL (`classy_state_dict`) and MMSelfSup (`backbone.`/`neck.` keys) files are recognised and refused:
their layouts have not been verified against those projects' converters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swav_train.checkpoint import CheckpointError
from swav_train.model import ResNetTrunk

RESNET50_BLOCKS = (3, 4, 6, 3)
MAX_ERRORS_SHOWN = 20
_OPTIONAL = "num_batches_tracked"  # a BatchNorm counter that evaluation never reads; older files lack it
_HUB_CLASSIFIER = ("fc.weight", "fc.bias")


@dataclass
class Layout:
    """A recognised checkpoint: its format, the tensors by our names, and what was left out."""

    format: str
    description: str
    trunk: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    prototypes: torch.Tensor | None
    width: int = 64
    base_width: int = 64
    hidden: int = 0
    feat_dim: int = 0
    left_out: dict[str, str] = field(default_factory=dict)  # key -> why it is not used
    metadata: dict = field(default_factory=dict)  # the wrapper's scalars (epoch, ...)

    @property
    def widen(self) -> float:
        return self.width / 64


def _tensors(d: dict, where: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in d.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: key {bad[0]!r} does not hold a tensor ({type(d[bad[0]]).__name__})")
    return dict(d)


def detect(obj: dict, path: str | Path) -> Layout:
    """Recognise the layout and map it strictly; raises CheckpointError naming the keys at fault."""
    if "classy_state_dict" in obj:
        raise CheckpointError(f"{path}: a VISSL checkpoint (classy_state_dict); VISSL layouts are not "
                              "supported: they have not been verified against VISSL's converter")
    metadata = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = _tensors(obj["state_dict"], f"{path}: state_dict")
        others = sorted(k for k in obj if k != "state_dict")
        metadata = {k: obj[k] for k in others if isinstance(obj[k], (int, float, str))}
        wrapped = {k: "training state, not needed to serve" for k in others}
        kind, where = "official-checkpoint", f"{path}: state_dict"
    else:
        sd = _tensors(obj, str(path))
        wrapped, kind, where = {}, None, str(path)
    if any(k.startswith(("backbone.", "neck.")) for k in sd):
        raise CheckpointError(f"{path}: an MMSelfSup checkpoint (backbone./neck. keys); MMSelfSup layouts are "
                              "not supported: they have not been verified against MMSelfSup's converter")
    prefixed = [k for k in sd if k.startswith("module.")]
    if prefixed and len(prefixed) != len(sd):
        odd = next(k for k in sd if not k.startswith("module."))
        raise CheckpointError(f"{where}: key {odd!r} lacks the 'module.' prefix that the other keys have")
    if prefixed:
        sd = {k[len("module."):]: v for k, v in sd.items()}
    has_head = any(k.startswith(("projection_head.", "prototypes.")) for k in sd)
    if kind is None:
        kind = "official" if has_head else "torchvision-backbone"
    elif not has_head:
        kind = "official-checkpoint-backbone"
    layout = _map(sd, kind, where)
    layout.metadata = metadata
    layout.left_out.update(wrapped)
    if kind == "official" and not prefixed:
        layout.description += " (without the 'module.' prefix)"
    return layout


_DESCRIPTIONS = {
    "official": "official SwAV release (flat state_dict, 'module.' keys)",
    "official-checkpoint": "official SwAV training checkpoint (state_dict + epoch + optimizer)",
    "official-checkpoint-backbone": "training checkpoint of a SwAV trunk without head",
    "torchvision-backbone": "torchvision ResNet-50 backbone (the torch.hub 'resnet50' entry), no head",
}


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _map(sd: dict[str, torch.Tensor], kind: str, where: str) -> Layout:
    errors: list[str] = []
    trunk = {k: v for k, v in sd.items() if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}
    head = {k[len("projection_head."):]: v for k, v in sd.items() if k.startswith("projection_head.")}
    protos = {k: v for k, v in sd.items() if k.startswith("prototypes.")}
    left_out: dict[str, str] = {}
    rest = [k for k in sd if k not in trunk and not k.startswith(("projection_head.", "prototypes."))]
    for k in rest:
        if kind == "torchvision-backbone" and k in _HUB_CLASSIFIER:
            left_out[k] = "torchvision's classifier, which SwAV does not train (random in the hub model)"
        else:
            errors.append(f"unexpected key {k!r}")

    stem = trunk.get("conv1.weight")
    if stem is None:
        raise CheckpointError(f"{where}: missing key 'conv1.weight' (not a ResNet-50 trunk)"
                              + (f"; also {'; '.join(errors[:MAX_ERRORS_SHOWN])}" if errors else ""))
    if stem.dim() != 4 or _shape(stem)[1:] != [3, 7, 7]:
        raise CheckpointError(f"{where}: wrong shape for 'conv1.weight': {_shape(stem)}, a ResNet-50 stem "
                              "is [width, 3, 7, 7]")
    width = int(stem.shape[0])
    inner = trunk.get("layer1.0.conv1.weight")
    base_width = 64
    if inner is not None and inner.dim() == 4 and (int(inner.shape[0]) * 64) % width == 0:
        base_width = int(inner.shape[0]) * 64 // width
    model = ResNetTrunk("resnet50", width=width, base_width=base_width)
    expected = model.state_dict()
    for k in expected:
        if k not in trunk and not k.endswith(_OPTIONAL):
            errors.append(f"missing key {k!r}")
    for k, v in trunk.items():
        if k not in expected:
            deeper = re.match(r"layer(\d)\.(\d+)\.", k)
            hint = ""
            if deeper and int(deeper.group(2)) >= RESNET50_BLOCKS[int(deeper.group(1)) - 1]:
                hint = f" (ResNet-50 has {RESNET50_BLOCKS[int(deeper.group(1)) - 1]} blocks in layer{deeper.group(1)}; " \
                       "deeper ResNets are not supported)"
            errors.append(f"unexpected key {k!r}{hint}")
        elif _shape(v) != _shape(expected[k]):
            errors.append(f"wrong shape for {k!r}: the file has {_shape(v)}, a ResNet-50 of width {width} "
                          f"(from conv1.weight) with inner width factor {base_width}/64 expects "
                          f"{_shape(expected[k])}")
    emb = model.out_dim
    hidden = feat = 0
    if head:
        first, last = head.get("0.weight"), head.get("3.weight")
        hidden = int(first.shape[0]) if first is not None and first.dim() == 2 else 0
        feat = int(last.shape[0]) if last is not None and last.dim() == 2 else 0
        want = {"0.weight": [hidden, emb], "0.bias": [hidden], "1.weight": [hidden], "1.bias": [hidden],
                "1.running_mean": [hidden], "1.running_var": [hidden], "1.num_batches_tracked": [],
                "3.weight": [feat, hidden], "3.bias": [feat]}
        for k, shape in want.items():
            if k not in head and not k.endswith(_OPTIONAL):
                errors.append(f"missing key 'projection_head.{k}'")
            elif k in head and _shape(head[k]) != shape:
                errors.append(f"wrong shape for 'projection_head.{k}': the file has {_shape(head[k])}, "
                              f"expected {shape} (embedding {emb}, hidden {hidden}, output {feat})")
        errors += [f"unexpected key 'projection_head.{k}'" for k in head if k not in want]
    prototypes = None
    if protos:
        if "prototypes.weight" not in protos:
            errors.append(f"unexpected key {sorted(protos)[0]!r} (several prototype heads are not supported)")
        else:
            prototypes = protos["prototypes.weight"]
            if not head:
                errors.append("key 'prototypes.weight' without a projection head (missing key "
                              "'projection_head.0.weight')")
            elif prototypes.dim() != 2 or int(prototypes.shape[1]) != feat:
                errors.append(f"wrong shape for 'prototypes.weight': the file has {_shape(prototypes)}, "
                              f"expected [K, {feat}]")
            errors += [f"unexpected key {k!r}" + (" (several prototype heads are not supported)"
                                                  if k.startswith("prototypes.prototypes") else "")
                       for k in protos if k != "prototypes.weight"]
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise CheckpointError(f"{where}: does not match the {_DESCRIPTIONS[kind]} layout:\n  "
                              + "\n  ".join(shown) + more)
    return Layout(format=kind, description=_DESCRIPTIONS[kind], trunk=trunk, head=head, prototypes=prototypes,
                  width=width, base_width=base_width, hidden=hidden, feat_dim=feat, left_out=left_out)


def check_widen(layout: Layout, widen: int | None) -> None:
    """With an expected widen factor (the user's --arch), a file of another width is an error naming the key."""
    if widen is not None and layout.width != 64 * widen:
        raise CheckpointError(f"wrong width: 'conv1.weight' has {layout.width} output channels, "
                              f"ResNet-50-w{widen} has {64 * widen}")
