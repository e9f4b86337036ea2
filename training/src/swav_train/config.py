"""The training configuration: one frozen dataclass, documented field by field.

Every field carries its documentation in ``metadata["help"]``; the command line
(`cli.py`) is generated from it, so ``--help`` and this file cannot disagree.
Defaults are those of the paper's ImageNet runs (facebookresearch/swav,
``main_swav.py``); the ``fashion-mnist`` preset is a small CPU-sized variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)
# Measured on the 60000 Fashion-MNIST training images (pixels / 255).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

ARCHS = ("resnet18", "resnet34", "resnet50")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATASETS = ("folder", "fashion-mnist")
STEMS = ("auto", "imagenet", "small", "small-stride2")
AUGMENTS = ("auto", "pil", "tensor")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # ---- data -------------------------------------------------------------
    dataset: str = _f("folder", "training data: 'folder' (any images under --data-dir, searched recursively, no labels) or 'fashion-mnist' (IDX files)")
    data_dir: str = _f("", "image folder for dataset=folder")
    fashion_mnist_dir: str = _f(FASHION_MNIST_DIR, "directory holding the Fashion-MNIST IDX .gz files (training data for dataset=fashion-mnist, and the labelled evaluation set unless --eval-train-dir and --eval-test-dir are given)")
    max_images: int = _f(0, "use only the first N training images (0 = all); for smoke tests")
    channels: int = _f(3, "input channels of the model: 1 (grayscale) or 3 (RGB); images are converted by the bundle preprocessing rule")
    image_size: int = _f(224, "model input height and width at inference (the centre crop of the exported bundle)")
    resize_size: int = _f(256, "inference resize: the shorter side becomes this many pixels before the centre crop")
    mean: tuple[float, ...] = _f(IMAGENET_MEAN, "per-channel normalisation mean (applied inside the exported graph)")
    std: tuple[float, ...] = _f(IMAGENET_STD, "per-channel normalisation std (applied inside the exported graph)")
    num_workers: int = _f(4, "DataLoader worker processes per rank (0 = load in the training process); the PIL augmentation path only")
    augment: str = _f("auto", "where the multi-crop runs: 'pil' (per image, PIL, in DataLoader workers; any images), 'tensor' (batched on uint8 tensors in the training process; data sets held in memory, i.e. fashion-mnist) or 'auto' (tensor for fashion-mnist, else pil)")
    # ---- multi-crop augmentation -----------------------------------------
    nmb_crops: tuple[int, ...] = _f((2, 6), "number of crops per resolution, e.g. 2 6")
    size_crops: tuple[int, ...] = _f((224, 96), "crop size in pixels per resolution")
    min_scale_crops: tuple[float, ...] = _f((0.14, 0.05), "RandomResizedCrop lower scale bound per resolution")
    max_scale_crops: tuple[float, ...] = _f((1.0, 0.14), "RandomResizedCrop upper scale bound per resolution")
    color_jitter: tuple[float, ...] = _f((0.8, 0.8, 0.8, 0.2), "ColorJitter brightness, contrast, saturation, hue (1-channel data uses brightness and contrast only)")
    color_jitter_p: float = _f(0.8, "probability of applying colour jitter")
    grayscale_p: float = _f(0.2, "probability of RandomGrayscale (ignored for 1-channel data)")
    blur_p: float = _f(0.5, "probability of Gaussian blur")
    blur_sigma: tuple[float, ...] = _f((0.1, 2.0), "Gaussian blur sigma range (PIL radius), min max")
    # ---- model -----------------------------------------------------------
    arch: str = _f("resnet50", "backbone: resnet18, resnet34 or resnet50 (torchvision blocks, never pretrained)")
    width: int = _f(64, "base width of the ResNet (64 = torchvision's; 16 or 32 for CPU-sized runs)")
    stem: str = _f("auto", "'imagenet' (7x7 stride-2 conv + max-pool), 'small' (3x3 stride-1 conv, no max-pool), 'small-stride2' (3x3 stride-2 conv, no max-pool: a quarter of the small stem's activations) or 'auto' (small when image_size <= 64)")
    hidden_mlp: int = _f(2048, "hidden units of the projection MLP")
    feat_dim: int = _f(128, "projection (embedding) dimension d")
    nmb_prototypes: int = _f(3000, "number of prototypes K")
    embedding_layer: int = _f(4, "which ResNet stage's average-pooled output the bundle's `embedding` output is, the vector that search, kNN, the linear probe and k-means use: 4 (the last, as in the paper) or 3 (half as many dimensions, from a map of twice the resolution; on small inputs, where the last stage's map is only 2x2, it can serve kNN better, see training/BENCHMARKS.md). The projection head and prototypes always take stage 4, so this changes no training, only the export (`export --embedding-layer` changes it for an existing model)")
    # ---- SwAV ------------------------------------------------------------
    crops_for_assign: tuple[int, ...] = _f((0, 1), "crop ids whose codes are predicted by the other crops")
    temperature: float = _f(0.1, "softmax temperature of the swapped prediction")
    epsilon: float = _f(0.05, "entropic regularisation of Sinkhorn-Knopp")
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations")
    freeze_prototypes_niters: int = _f(313, "iterations during which the prototypes get no update")
    queue_length: int = _f(0, "length of the embedding queue over all ranks (0 = no queue); rounded down to a multiple of batch_size * world_size")
    epoch_queue_starts: int = _f(15, "epoch from which the queue is used")
    # ---- optimisation ----------------------------------------------------
    epochs: int = _f(100, "number of training epochs")
    time_budget_min: float = _f(0.0, "train for this many minutes instead of a number of epochs (0 = use --epochs): after the first 20 steps the run measures its speed and fixes how many steps fit, and the warmup and cosine decay take the same shares of those steps as of --epochs; for comparing recipes at equal wall-clock; such a run cannot be resumed")
    steps: int = _f(0, "train for exactly this many optimiser steps instead of --epochs (0 = use --epochs); the warmup and cosine decay take the same shares of them as of --epochs. A --time-budget-min run logs the steps it fixed, so this repeats it exactly")
    batch_size: int = _f(64, "images per rank per step")
    base_lr: float = _f(4.8, "learning rate after warmup")
    final_lr: float = _f(0.0048, "learning rate at the end of the cosine schedule")
    warmup_epochs: int = _f(10, "epochs of linear warmup")
    start_warmup: float = _f(0.0, "learning rate at the start of warmup")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-6, "weight decay")
    trust_coefficient: float = _f(0.001, "LARS/LARC trust coefficient")
    # ---- run -------------------------------------------------------------
    init_from: str = _f("", "start the weights from this bundle directory (written by this trainer) or checkpoint.pt instead of a random init, to fine-tune: the model config must match it, and the optimiser, learning-rate schedule and step count start afresh; a bundle's folded BatchNorms get their statistics back from the first training crops")
    seed: int = _f(31, "random seed (model init, augmentation, data order)")
    device: str = _f("auto", "'auto' (CUDA when available), 'cpu' or 'cuda'")
    precision: str = _f("auto", "'auto' (bf16 on GPUs that support it, else fp32), 'fp32', 'bf16' (autocast; on the CPU only where it has native bf16, AVX512-BF16 or AMX) or 'fp16' (CUDA, with GradScaler)")
    sync_bn: bool = _f(True, "use SyncBatchNorm under multi-GPU DDP")
    channels_last: bool = _f(True, "channels_last memory format for the model and crops (faster convolutions on CUDA, and on CPU with oneDNN); on the CPU, strided 1x1 convolutions over fewer than a multiple of 16 channels stay contiguous, where oneDNN's kernel corrupts memory")
    crash_guard: bool = _f(True, "before the first step, run one forward and backward pass in a child process; if it dies by a signal (a native crash), retry it without channels_last and train that way, or stop with an error if that dies too")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    log_every: int = _f(10, "write a metrics.jsonl line every N iterations")
    progress: bool = _f(True, "show a progress bar")
    # ---- evaluation ------------------------------------------------------
    evaluate: bool = _f(True, "evaluate on the labelled set at the end of training")
    eval_train_dir: str = _f("", "labelled reference folder for evaluation, one subfolder per class (ROOT/<class>/<image>); with --eval-test-dir it replaces Fashion-MNIST as the labelled set")
    eval_test_dir: str = _f("", "labelled query folder for evaluation, with the same class subfolders as --eval-train-dir")
    eval_train_size: int = _f(0, "labelled reference images for evaluation, a random subset (0 = all; Fashion-MNIST has 60000)")
    eval_test_size: int = _f(0, "labelled query images for evaluation, a random subset (0 = all; Fashion-MNIST has 10000)")
    # ---- bundle ----------------------------------------------------------
    name: str = _f("", "bundle name shown by the server (default: <dataset>-<arch>w<width>)")
    description: str = _f("", "free-text bundle description")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f.name, f.type, getattr(self, f.name)))
        _validate(self)

    # -- derived values ----------------------------------------------------
    @property
    def total_crops(self) -> int:
        return sum(self.nmb_crops)

    @property
    def small_stem(self) -> bool:
        if self.stem == "auto":
            return self.image_size <= 64
        return self.stem in ("small", "small-stride2")

    @property
    def stem_stride(self) -> int:
        return 2 if self.stem == "small-stride2" else 1

    @property
    def tensor_augment(self) -> bool:
        """Whether the multi-crop runs batched on tensors (`batch_augment`) rather than per PIL image."""
        return self.augment == "tensor" or (self.augment == "auto" and self.dataset == "fashion-mnist")

    @property
    def bundle_name(self) -> str:
        return self.name or f"{self.dataset}-{self.arch}w{self.width}"

    def effective_queue_length(self, world_size: int) -> int:
        """Queue length over all ranks, a multiple of batch_size * world_size (as the paper's code)."""
        step = self.batch_size * world_size
        return self.queue_length - (self.queue_length % step)

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def field_types() -> dict[str, Any]:
    """Field name -> the declared type (as a string annotation)."""
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def from_dict(values: dict[str, Any]) -> TrainConfig:
    known = field_types()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    return TrainConfig(**values)


def load(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Load a JSON config; fields it omits come from `base` (or the defaults)."""
    p = Path(path)
    try:
        values = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    start = base.to_dict() if base else {}
    return from_dict({**start, **values})


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _imagenet() -> TrainConfig:
    return TrainConfig()


def _fashion_mnist() -> TrainConfig:
    # 28x28 grayscale, the winner of the recipe search at one wall-clock budget (training/BENCHMARKS.md):
    # ResNet-18 at width 32 behind a 3x3 stride-2 stem (resolution is what costs on a CPU, width is
    # cheap), two global crops at full size and four 16 px local crops, milder crops and blur than the
    # paper's 224 px ones (those erase a 28 px image), lr 2.4 with LARS at batch 256. No queue: at batch
    # 256 and K 300 it is not needed, and one started mid-run made the codes collapse (training/BENCHMARKS.md).
    # The default model ran this recipe for --steps 8579 under --precision bf16 (its model card).
    # It is served at 32 px, upscaled from 28: random-resized crops train on objects drawn larger than
    # a whole image shows them, and at 32 px every frozen-feature measure rose (FixRes, Touvron et al.
    # 2019; the size was chosen on a split of the training set, training/BENCHMARKS.md).
    return TrainConfig(
        dataset="fashion-mnist",
        channels=1,
        image_size=32,
        resize_size=32,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        num_workers=1,
        nmb_crops=(2, 4),
        size_crops=(28, 16),
        min_scale_crops=(0.3, 0.1),
        max_scale_crops=(1.0, 0.4),
        blur_sigma=(0.1, 0.5),
        arch="resnet18",
        width=32,
        stem="small-stride2",
        hidden_mlp=512,
        feat_dim=128,
        # K >= feat_dim: with fewer prototypes than dimensions a projection orthogonal to all of
        # them gives uniform codes and predictions, a fixed point SwAV falls into (measured: K=30
        # and K=100 at d=128 sit at loss ln K; K=300 learns).
        nmb_prototypes=300,
        # At 32 px stage 4 is a 2x2 map; stage 3's 4x4 one, pooled, served kNN, search and k-means
        # better and halves the embedding (chosen on a split of the training set, training/BENCHMARKS.md).
        embedding_layer=3,
        freeze_prototypes_niters=313,
        queue_length=0,
        epochs=14,
        batch_size=256,
        base_lr=2.4,
        final_lr=0.0024,
        warmup_epochs=2,
    )


PRESETS = {"imagenet": _imagenet, "fashion-mnist": _fashion_mnist}


_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _scalar(name: str, kind: type, value: Any) -> Any:
    # bool is an int to Python, and JSON's 3.0 is a float: neither is an integer here.
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{name}={value!r}: must be {_KIND[kind]}, not {type(value).__name__}")
    return value


def field_kind(annotation: Any) -> tuple[type, bool]:
    """(element type, whether the field is a tuple of them) for a TrainConfig field annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if text.startswith("tuple["):
        return _SCALARS[text[len("tuple["):].split(",")[0].strip()], True
    return _SCALARS[text], False


def _typed(name: str, annotation: Any, value: Any) -> Any:
    """`value` checked against the field's annotation: ints become floats where a float is
    declared, lists become tuples; anything else of the wrong type is a ConfigError."""
    kind, is_tuple = field_kind(annotation)
    if not is_tuple:
        return _scalar(name, kind, value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={value!r}: must be a list, each value {_KIND[kind]}")
    return tuple(_scalar(f"{name}[{i}]", kind, v) for i, v in enumerate(value))


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{name}={getattr(c, name)!r}: {why}")

    need(c.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
    need(c.max_images >= 0, "max_images", "must be >= 0")
    need(c.channels in (1, 3), "channels", "must be 1 or 3")
    need(c.image_size > 0, "image_size", "must be positive")
    need(c.resize_size >= c.image_size, "resize_size", "must be >= image_size (the centre crop is taken from the resized image)")
    need(len(c.mean) == c.channels, "mean", f"needs one value per channel ({c.channels})")
    need(len(c.std) == c.channels and all(s > 0 for s in c.std), "std", f"needs {c.channels} positive values")
    need(c.num_workers >= 0, "num_workers", "must be >= 0")
    n = len(c.nmb_crops)
    need(n > 0 and all(k > 0 for k in c.nmb_crops), "nmb_crops", "needs positive counts")
    for name in ("size_crops", "min_scale_crops", "max_scale_crops"):
        need(len(getattr(c, name)) == n, name, f"needs {n} values, one per entry of nmb_crops")
    need(all(s > 0 for s in c.size_crops), "size_crops", "must be positive")
    need(all(0 < lo <= hi <= 1 for lo, hi in zip(c.min_scale_crops, c.max_scale_crops)), "min_scale_crops",
         "each scale range needs 0 < min <= max <= 1")
    need(len(c.color_jitter) == 4 and all(v >= 0 for v in c.color_jitter) and c.color_jitter[3] <= 0.5,
         "color_jitter", "needs 4 values: brightness, contrast, saturation >= 0 and hue in [0, 0.5]")
    for name in ("color_jitter_p", "grayscale_p", "blur_p"):
        need(0 <= getattr(c, name) <= 1, name, "is a probability in [0, 1]")
    need(len(c.blur_sigma) == 2 and 0 < c.blur_sigma[0] <= c.blur_sigma[1], "blur_sigma", "needs 0 < min <= max")
    need(c.augment in AUGMENTS, "augment", f"must be one of {AUGMENTS}")
    need(c.augment != "tensor" or c.dataset == "fashion-mnist", "augment",
         "'tensor' needs the images in memory (dataset=fashion-mnist); use 'pil' for image folders")
    need(c.arch in ARCHS, "arch", f"must be one of {ARCHS}")
    need(c.width > 0, "width", "must be positive")
    need(c.stem in STEMS, "stem", f"must be one of {STEMS}")
    for name in ("hidden_mlp", "feat_dim", "nmb_prototypes"):
        need(getattr(c, name) > 0, name, "must be positive")
    need(c.embedding_layer in (3, 4), "embedding_layer", "must be 3 or 4 (the ResNet stage the embedding is pooled from)")
    need(c.total_crops >= 2, "nmb_crops", "SwAV needs at least 2 crops in total")
    need(len(c.crops_for_assign) > 0 and all(0 <= i < c.total_crops for i in c.crops_for_assign),
         "crops_for_assign", f"crop ids must lie in [0, {c.total_crops})")
    need(len(set(c.crops_for_assign)) == len(c.crops_for_assign), "crops_for_assign", "must not repeat")
    need(c.temperature > 0, "temperature", "must be positive")
    need(c.epsilon > 0, "epsilon", "must be positive")
    need(c.sinkhorn_iterations >= 1, "sinkhorn_iterations", "must be >= 1")
    need(c.freeze_prototypes_niters >= 0, "freeze_prototypes_niters", "must be >= 0")
    need(c.queue_length >= 0, "queue_length", "must be >= 0")
    need(c.epoch_queue_starts >= 0, "epoch_queue_starts", "must be >= 0")
    need(c.epochs > 0, "epochs", "must be positive")
    need(math.isfinite(c.time_budget_min) and c.time_budget_min >= 0, "time_budget_min", "must be a finite number >= 0")
    need(c.steps >= 0, "steps", "must be >= 0")
    need(not (c.steps and c.time_budget_min), "steps", "cannot be combined with --time-budget-min (both fix the run's length)")
    need(c.batch_size > 1, "batch_size", "must be > 1 (BatchNorm needs more than one sample)")
    need(0 <= c.warmup_epochs < c.epochs, "warmup_epochs", "must lie in [0, epochs)")
    for name in ("base_lr", "final_lr", "start_warmup", "weight_decay", "trust_coefficient"):
        v = getattr(c, name)
        need(math.isfinite(v) and v >= 0, name, "must be a finite number >= 0")
    need(0 <= c.momentum < 1, "momentum", "must lie in [0, 1)")
    need(c.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    need(c.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
    need(c.threads >= 0, "threads", "must be >= 0")
    need(c.log_every > 0, "log_every", "must be positive")
    need(c.eval_train_size >= 0 and c.eval_test_size >= 0, "eval_train_size", "sizes must be >= 0")
    for name, other in (("eval_train_dir", "eval_test_dir"), ("eval_test_dir", "eval_train_dir")):
        need(bool(getattr(c, name)) or not getattr(c, other), name,
             f"must be given together with {other} (labelled reference and query folders)")
