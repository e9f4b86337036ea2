"""`python -m swav_train import CHECKPOINT --out BUNDLE`: released SwAV checkpoints as swav bundles.

The file is read with `torch.load(weights_only=True)`, its layout recognised and every key mapped
strictly (`layouts.py`); then the model goes through the same ONNX export and onnxruntime parity
check as the trainer's bundles (`export.py`).
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swav_train import export, preprocess
from swav_train.checkpoint import CheckpointError, read
from swav_train.data import scan_folder
from swav_train.importers.layouts import Layout, check_widen, detect
from swav_train.model import ResNetTrunk

__all__ = ["CheckpointError", "ImportOptions", "ImportedModel", "build_model", "import_checkpoint"]

log = logging.getLogger(__name__)

# The official evaluation transform (eval_linear.py): Resize(256), CenterCrop(224), these mean and std.
OFFICIAL_RESIZE, OFFICIAL_CROP = 256, 224
OFFICIAL_MEAN = (0.485, 0.456, 0.406)
OFFICIAL_STD = (0.228, 0.224, 0.225)
# Past this many bytes of weights, model.onnx keeps them in model.onnx.data: protobuf cannot hold
# more than 2 GB, and the wide models' float32 weights pass 1 GB.
EXTERNAL_DATA_BYTES = 1 << 30
PARITY_RANDOM_IMAGES = 2
PARITY_REAL_IMAGES = 4
EMBED_BATCH = 16


class ImportedModel(nn.Module):
    """What an imported bundle's graph computes from images in [0, 1]: `embedding` always;
    `projection` with a head; `prototype_scores` with prototypes; `centroid_scores` (cosine to
    k-means centroids of the embeddings) when centroids were computed at import."""

    def __init__(self, trunk: ResNetTrunk, head: nn.Module | None, prototypes: torch.Tensor | None,
                 mean=OFFICIAL_MEAN, std=OFFICIAL_STD):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.prototypes: torch.Tensor | None
        self.centroids: torch.Tensor | None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("prototypes", None if prototypes is None else F.normalize(prototypes.float(), dim=1))
        self.register_buffer("centroids", None)

    @property
    def output_names(self) -> tuple[str, ...]:
        names = ["embedding"]
        if self.head is not None:
            names.append("projection")
        if self.prototypes is not None:
            names.append("prototype_scores")
        if self.centroids is not None:
            names.append("centroid_scores")
        return tuple(names)

    def set_centroids(self, centroids: np.ndarray) -> None:
        self.centroids = F.normalize(torch.from_numpy(np.asarray(centroids, dtype=np.float32)), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.trunk((images - self.mean) / self.std)
        embedding = F.normalize(feats, dim=1, p=2)
        out = [embedding]
        if self.head is not None:
            projection = F.normalize(self.head(feats), dim=1, p=2)
            out.append(projection)
            if self.prototypes is not None:
                out.append(projection @ self.prototypes.t())
        if self.centroids is not None:
            out.append(embedding @ self.centroids.t())
        return tuple(out)


def _float(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _load_exactly(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(_float(sd), strict=False)
    # layouts.py already matched every key; only the BatchNorm counters may be absent.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{what}: missing {missing}, unexpected {result.unexpected_keys}")


def build_model(layout: Layout) -> ImportedModel:
    trunk = ResNetTrunk("resnet50", width=layout.width, base_width=layout.base_width)
    _load_exactly(trunk, layout.trunk, "trunk")
    head = None
    if layout.head:
        head = nn.Sequential(nn.Linear(trunk.out_dim, layout.hidden), nn.BatchNorm1d(layout.hidden),
                             nn.ReLU(inplace=True), nn.Linear(layout.hidden, layout.feat_dim))
        _load_exactly(head, layout.head, "projection head")
    return ImportedModel(trunk, head, layout.prototypes).eval()


@dataclass(frozen=True)
class ImportOptions:
    name: str | None = None
    widen: int | None = None  # expected RN50-wN; None = whatever the file holds
    fp16: bool = False
    external_data: str = "auto"  # auto | always | never
    cluster_images: str | None = None
    clusters: int = 0
    resize: int = OFFICIAL_RESIZE
    crop: int = OFFICIAL_CROP


def _arch_name(layout: Layout) -> str:
    w = layout.widen
    if layout.width % 64 == 0 and layout.base_width == layout.width:
        return "resnet50" if w == 1 else f"resnet50w{int(w)}"
    return f"resnet50 (width {layout.width}, bottleneck width factor {layout.base_width}/64)"


def summary(layout: Layout) -> str:
    parts = [f"found: {layout.description}", f"trunk {_arch_name(layout)}, embedding {layout.width * 32}"]
    if layout.head:
        parts.append(f"projection head {layout.width * 32} -> {layout.hidden} -> {layout.feat_dim}")
    parts.append(f"{layout.prototypes.shape[0]} prototypes" if layout.prototypes is not None else "no prototypes")
    return "; ".join(parts)


@torch.no_grad()
def _embed(model: ImportedModel, tensors: np.ndarray) -> np.ndarray:
    rows = [model(torch.from_numpy(tensors[i:i + EMBED_BATCH]))[0].numpy()
            for i in range(0, len(tensors), EMBED_BATCH)]
    return np.concatenate(rows)


def _load_images(folder: str, spec: preprocess.InputSpec) -> tuple[list[Path], np.ndarray]:
    paths, _bad = scan_folder(folder, "cluster image folder")
    good, arrays = [], []
    for p in paths:
        try:
            arrays.append(preprocess.load_array(p, spec))
            good.append(p)
        except (OSError, ValueError) as e:
            log.warning("skipping %s: %s", p, e)
    if not arrays:
        raise CheckpointError(f"no usable images in {folder}")
    return good, np.stack(arrays)


def _kmeans(embeddings: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    if len(embeddings) < k:
        raise CheckpointError(f"--clusters {k} needs at least {k} images, the folder has {len(embeddings)}")
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit(embeddings).cluster_centers_


def _output_spec(names: tuple[str, ...], dims: dict[str, int]) -> dict:
    out: dict[str, dict | None] = {n: None for n in ("embedding", "projection", "prototype_scores", "centroid_scores")}
    for n in names:
        out[n] = {"name": n, "dim": dims[n]}
    return out


def import_checkpoint(checkpoint: str | Path, out_dir: str | Path, options: ImportOptions = ImportOptions()) -> dict:
    """Writes OUT_DIR/{model.onnx[, model.onnx.data], manifest.json}; returns the manifest."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if options.external_data not in ("auto", "always", "never"):
        raise CheckpointError(f"--external-data must be auto, always or never, got {options.external_data!r}")
    layout = detect(read(checkpoint), checkpoint)
    check_widen(layout, options.widen)
    print(summary(layout), flush=True)
    for key, why in sorted(layout.left_out.items()):
        print(f"left out: {key}: {why}", flush=True)
    model = build_model(layout)
    spec = preprocess.InputSpec(3, options.resize, options.crop, options.crop)

    real = np.zeros((0, 3, options.crop, options.crop), dtype=np.float32)
    cluster_info = None
    if options.cluster_images or options.clusters:
        if layout.prototypes is not None:
            raise CheckpointError("the checkpoint has prototypes, which /v1/clusters uses; --cluster-images and "
                                  "--clusters are for files without them")
        if not (options.cluster_images and options.clusters > 0):
            raise CheckpointError("--cluster-images DIR and --clusters K (K >= 1) go together")
        paths, real = _load_images(options.cluster_images, spec)
        centroids = _kmeans(_embed(model, real), options.clusters)
        model.set_centroids(centroids)
        cluster_info = {"images": str(Path(options.cluster_images).resolve()), "num_images": len(paths),
                        "clusters": options.clusters, "method": "k-means (scikit-learn, 10 restarts) on the "
                        "L2-normalised embeddings; centroids L2-normalised"}
        print(f"k-means: {options.clusters} centroids from {len(paths)} images", flush=True)

    rng = np.random.default_rng(0)
    batch = np.concatenate([rng.random((PARITY_RANDOM_IMAGES, 3, options.crop, options.crop), dtype=np.float32),
                            real[:PARITY_REAL_IMAGES]])
    names = model.output_names
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".import-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        manifest = _export(model, names, spec, batch, out_dir, work, options)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    dims = {"embedding": model.trunk.out_dim, "projection": layout.feat_dim,
            "prototype_scores": 0 if layout.prototypes is None else int(layout.prototypes.shape[0]),
            "centroid_scores": options.clusters}
    arch = _arch_name(layout)
    manifest.update({
        "name": options.name or f"swav-{arch.split(' ')[0]}" + ("-fp16" if options.fp16 else ""),
        "description": f"{layout.description}: {checkpoint.name}, imported by swav import",
        "input": spec.manifest(OFFICIAL_MEAN, OFFICIAL_STD),
        "outputs": _output_spec(names, dims),
        "num_prototypes": dims["prototype_scores"],
        "backbone": arch,
        "training": {"temperature": 0.1} if layout.prototypes is not None else {},
        "dataset": {"name": "unknown: imported checkpoint"},
        "evaluation": None,
        "golden": None,
        "source": {"file": checkpoint.name, "sha256": export.sha256_file(checkpoint), "format": layout.format,
                   "description": layout.description, "width": layout.width, "base_width": layout.base_width,
                   "hidden_mlp": layout.hidden, "feat_dim": layout.feat_dim, "left_out": layout.left_out,
                   "metadata": layout.metadata},
        "clusters": cluster_info,
    })
    order = ["name", "description", "created_utc", "model_file", "model_sha256", "model_data", "input", "outputs",
             "num_prototypes", "backbone", "training", "dataset", "evaluation", "parity", "golden", "source", "clusters"]
    ordered = {"schema_version": export.SCHEMA_VERSION, **{k: manifest[k] for k in order}}
    (out_dir / "manifest.json").write_text(json.dumps(ordered, indent=2) + "\n")
    return ordered


def _export(model: ImportedModel, names: tuple[str, ...], spec, batch: np.ndarray, out_dir: Path, work: Path,
            options: ImportOptions) -> dict:
    import onnx
    import onnxruntime as ort

    staged = work / "model.onnx"
    # Always staged with external data: the wide models pass protobuf's 2 GB in float32.
    export.export_onnx(model, 3, spec.height, staged, names, external_data=True)
    diff = export.parity_check(model, staged, batch, names)
    parity = {"onnxruntime_version": ort.__version__, "max_abs_diff": diff,
              "images": len(batch)}
    graph = onnx.load(str(staged))
    if options.fp16:
        export.weights_to_fp16(graph)
    weights = export.initializer_bytes(graph)
    external = options.external_data == "always" or (options.external_data == "auto" and weights > EXTERNAL_DATA_BYTES)
    final = out_dir / "model.onnx"
    data = export.save_onnx(graph, final, external)
    del graph
    if options.fp16:
        cosine = export.min_row_cosine(export.run_onnx(final, batch, names), export.run_onnx(staged, batch, names))
        if not cosine >= export.FP16_MIN_COSINE:
            raise export.ExportError(f"the float16 model disagrees with float32: cosine {cosine:.6f} < "
                                     f"{export.FP16_MIN_COSINE}")
        parity.update(fp16=True, fp16_min_cosine=cosine)
    else:
        parity["max_abs_diff"] = max(diff, export.parity_check(model, final, batch, names))
    print(f"parity: onnxruntime vs PyTorch max abs diff {parity['max_abs_diff']:.3g} on {len(batch)} images"
          + (f"; float16 vs float32 cosine >= {parity['fp16_min_cosine']:.6f}" if options.fp16 else ""), flush=True)
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_file": final.name,
        "model_sha256": export.sha256_file(final),
        "model_data": None if data is None else {"file": data.name, "sha256": export.sha256_file(data),
                                                 "bytes": data.stat().st_size},
        "parity": parity,
    }
