"""Backbone registry, projection head, prototypes, and the inference wrapper the bundle exports."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from swav_train.config import TrainConfig

# arch -> (block, blocks per stage); the torchvision definitions.
_RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetTrunk(nn.Module):
    """torchvision's ResNet without the classifier, with a configurable base width,
    input channels and stem. At width 64 with the ImageNet stem its layers and
    parameter shapes are exactly torchvision's. Never pretrained."""

    def __init__(self, arch: str, width: int = 64, in_channels: int = 3, small_stem: bool = False,
                 base_width: int = 64, stem_stride: int = 1):
        super().__init__()
        if arch not in _RESNETS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_RESNETS)}")
        block, layers = _RESNETS[arch]
        self.inplanes = width
        # torchvision's `width_per_group`: a bottleneck's inner width is planes * base_width / 64.
        self.base_width = base_width
        if small_stem:
            # Inputs <= 64 px would shrink to nothing under a stride-4 stem. Stride 2 halves the
            # resolution once: on the CPU, resolution costs far more than width (training/BENCHMARKS.md).
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        kw = {"base_width": self.base_width} if block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stage_dim(self, stage: int) -> int:
        """Channels of stage `stage` (1-4): each stage doubles its predecessor's."""
        return self.out_dim >> (4 - stage)

    def pooled(self, x: torch.Tensor, stages: tuple[int, ...] = (4,)) -> list[torch.Tensor]:
        """The globally average-pooled outputs of `stages`, in that order."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for stage, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1):
            x = layer(x)
            if stage in stages:
                out[stage] = torch.flatten(self.avgpool(x), 1)
        return [out[s] for s in stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(x)[0]


# oneDNN's CPU kernel for the weight gradient of a strided 1x1 convolution in channels_last
# overruns the heap when the input channels do not fill its 16-channel AVX-512 block (issue 20;
# training/README.md, "Memory format on the CPU"). Such layers keep the contiguous format.
_CPU_CHANNEL_BLOCK = 16


def channels_last_unsafe_on_cpu(conv: nn.Module) -> bool:
    """True for a convolution that must not run in channels_last on the CPU."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride != (1, 1)
            and conv.in_channels % _CPU_CHANNEL_BLOCK != 0)


def _to_contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(),) + tuple(args[1:])


def _to_channels_last_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous(memory_format=torch.channels_last)


def to_channels_last(model: nn.Module, device: torch.device) -> list[str]:
    """Put `model` (already on `device`) in the channels_last memory format, except, on the CPU,
    the convolutions for which oneDNN's channels_last kernels are known to corrupt memory: those
    keep contiguous weights and see contiguous inputs (their outputs go back to channels_last).
    Returns the names of the layers kept contiguous."""
    model.to(memory_format=torch.channels_last)
    if device.type != "cpu":
        return []
    kept = []
    for name, module in model.named_modules():
        if channels_last_unsafe_on_cpu(module):
            # .contiguous() would keep the strides: a 1x1 kernel counts as contiguous in both formats.
            module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_to_contiguous_input)
            module.register_forward_hook(_to_channels_last_output)
            kept.append(name)
    return kept


class SwAVModel(nn.Module):
    """Backbone -> projection MLP (L2-normalised) -> prototypes.

    `forward` takes the list of crops and runs each run of consecutive crops
    of equal resolution through the backbone as one batch (as the paper's
    code does); it returns (normalised projections, prototype scores) with the
    crops stacked in order.
    """

    def __init__(self, arch: str = "resnet50", width: int = 64, in_channels: int = 3, small_stem: bool = False,
                 hidden_mlp: int = 2048, feat_dim: int = 128, nmb_prototypes: int = 3000, stem_stride: int = 1,
                 embedding_layer: int = 4):
        super().__init__()
        self.backbone = ResNetTrunk(arch, width, in_channels, small_stem, stem_stride=stem_stride)
        # Which stage's pooled output the bundle's `embedding` is; training never reads it.
        self.embedding_layer = embedding_layer
        e = self.backbone.out_dim
        self.projection_head = nn.Sequential(
            nn.Linear(e, hidden_mlp), nn.BatchNorm1d(hidden_mlp), nn.ReLU(inplace=True), nn.Linear(hidden_mlp, feat_dim))
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SwAVModel:
        return cls(cfg.arch, cfg.width, cfg.channels, cfg.small_stem, cfg.hidden_mlp, cfg.feat_dim, cfg.nmb_prototypes,
                   stem_stride=cfg.stem_stride, embedding_layer=cfg.embedding_layer)

    @property
    def embedding_dim(self) -> int:
        return self.backbone.stage_dim(self.embedding_layer)

    def project(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projection_head(features), dim=1, p=2)
        return z, self.prototypes(z)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        feats, start = [], 0
        for end in ends:
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.project(torch.cat(feats))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype row in place; the training loop calls it before every step."""
        w = self.prototypes.weight.data.clone()
        self.prototypes.weight.copy_(F.normalize(w, dim=1, p=2))


class InferenceModel(nn.Module):
    """What the bundle's ONNX graph computes: images in [0, 1] ->
    (embedding, projection, prototype_scores), normalisation inside the graph."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: SwAVModel, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std
        # At embedding_layer 4 both are the same pooled tensor.
        emb, feats = self.model.backbone.pooled(x, (self.model.embedding_layer, 4))
        embedding = F.normalize(emb, dim=1, p=2)
        projection = F.normalize(self.model.projection_head(feats), dim=1, p=2)
        prototypes = F.normalize(self.model.prototypes.weight, dim=1, p=2)
        return embedding, projection, projection @ prototypes.t()
