"""Frozen-feature evaluation on a labelled set: Fashion-MNIST test against train (the default),
or a labelled query folder against a labelled reference folder (ROOT/<class>/<image>).

- linear probe: multinomial logistic regression (scikit-learn, lbfgs, C=1) on the
  standardised L2-normalised pooled features of the train split, top-1 on test;
- weighted kNN (k=20, cosine, T=0.07; InstDisc/DINO weights exp(sim/T) summed per class);
- NMI and ARI of k-means (k = number of classes, 10 restarts) on the test embeddings,
  and of the prototype argmax assignments.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from swav_train import preprocess
from swav_train.config import FASHION_MNIST_DIR, ConfigError, TrainConfig
from swav_train.data import FASHION_MNIST_CLASSES, DataError, labelled_folder_pair, load_fashion_mnist
from swav_train.model import InferenceModel, SwAVModel
from swav_train.preprocess import InputSpec

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Loader = Callable[[Any, InputSpec], np.ndarray]
KNN_K, KNN_T = 20, 0.07


# ---- the labelled set --------------------------------------------------------

def _from_uint8(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    return preprocess.to_array(Image.fromarray(image), spec)


@dataclass(frozen=True)
class LabelledData:
    """Both splits of a labelled set; `load` turns one item into the model's input tensor."""

    name: str
    classes: tuple[str, ...]
    train_items: np.ndarray  # uint8 H x W images, or image paths (dtype object)
    train_labels: np.ndarray
    test_items: np.ndarray
    test_labels: np.ndarray
    load: Loader
    skipped: int = 0  # files left out while listing the folders


def _fashion_mnist_data(root: str) -> LabelledData:
    train_images, train_labels = load_fashion_mnist(root, "train")
    test_images, test_labels = load_fashion_mnist(root, "t10k")
    return LabelledData("fashion-mnist", FASHION_MNIST_CLASSES, train_images, train_labels, test_images,
                        test_labels, _from_uint8)


def _object_array(paths: tuple[Path, ...]) -> np.ndarray:
    # An object array, so that index arrays select paths as they select Fashion-MNIST images.
    items = np.empty(len(paths), dtype=object)
    items[:] = paths
    return items


def _folder_data(train_dir: str, test_dir: str) -> LabelledData:
    train, test = labelled_folder_pair(train_dir, test_dir)
    return LabelledData(f"folders:{train.root.resolve()}|{test.root.resolve()}", train.classes,
                        _object_array(train.paths), train.labels, _object_array(test.paths), test.labels,
                        preprocess.load_array, len(train.skipped) + len(test.skipped))


@dataclass(frozen=True)
class EvalSet:
    """Which labelled set to evaluate on: the two labelled folders when given, else Fashion-MNIST."""

    fashion_mnist_dir: str = FASHION_MNIST_DIR
    train_dir: str = ""
    test_dir: str = ""

    def __post_init__(self) -> None:
        if bool(self.train_dir) != bool(self.test_dir):
            raise ConfigError("folder evaluation needs both --eval-train-dir (labelled reference images) and "
                              "--eval-test-dir (labelled query images)")

    @property
    def uses_folders(self) -> bool:
        return bool(self.train_dir)

    @classmethod
    def of(cls, training: Mapping[str, Any]) -> EvalSet:
        """From a TrainConfig's dict (a checkpoint's, or a manifest's `training`); older ones lack the folders."""
        return cls(training.get("fashion_mnist_dir") or FASHION_MNIST_DIR, training.get("eval_train_dir") or "",
                   training.get("eval_test_dir") or "")

    def override(self, fashion_mnist_dir: str | None = None, train_dir: str | None = None,
                 test_dir: str | None = None) -> EvalSet:
        """Command-line choices over the recorded ones: folders first, then a Fashion-MNIST directory."""
        if train_dir or test_dir:
            return EvalSet(self.fashion_mnist_dir, train_dir or "", test_dir or "")
        if fashion_mnist_dir:
            return EvalSet(fashion_mnist_dir)
        return self

    def load(self) -> LabelledData:
        if self.uses_folders:
            return _folder_data(self.train_dir, self.test_dir)
        return _fashion_mnist_data(self.fashion_mnist_dir)

    def check(self) -> None:
        """Raise DataError when either split is missing or unusable: the folders are scanned, not
        decoded; Fashion-MNIST's IDX files are read (both fit in memory in about a second)."""
        if self.uses_folders:
            labelled_folder_pair(self.train_dir, self.test_dir)
        else:
            for split in ("train", "t10k"):
                load_fashion_mnist(self.fashion_mnist_dir, split)


# ---- encoders ----------------------------------------------------------------

def spec_of(cfg: TrainConfig) -> InputSpec:
    return InputSpec(cfg.channels, cfg.resize_size, cfg.image_size, cfg.image_size)


def torch_encoder(model: SwAVModel, mean, std) -> Encoder:
    wrapper = InferenceModel(model, mean, std).eval()

    @torch.no_grad()
    def encode(batch: np.ndarray):
        return tuple(t.numpy() for t in wrapper(torch.from_numpy(batch)))

    return encode


def onnx_encoder(model_path: str | Path) -> Encoder:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def encode(batch: np.ndarray):
        return tuple(session.run(["embedding", "projection", "prototype_scores"], {"images": batch}))

    return encode


def _subset(n_total: int, size: int, seed: int) -> np.ndarray:
    if size <= 0 or size >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:size])


def _batch_size(spec: InputSpec) -> int:
    # 512 Fashion-MNIST-sized inputs per batch; fewer for larger ones, so that one
    # batch's activations stay about as large.
    return int(np.clip(512 * 28 * 28 // (spec.height * spec.width), 16, 512))


def _load_or_skip(load: Loader, item, spec: InputSpec) -> np.ndarray | None:
    try:
        return load(item, spec)
    except Exception as e:  # a header that parsed can still hide broken pixel data
        log.warning("skipping unreadable image %s (%s: %s)", item, type(e).__name__, e)
        return None


def encode_images(encode: Encoder, items: np.ndarray, spec: InputSpec, load: Loader = _from_uint8,
                  batch_size: int | None = None):
    """Encode items (by default uint8 H x W arrays) through the bundle preprocessing rule:
    (embeddings, projections, prototype scores, indices of the items encoded). An item
    that cannot be decoded is reported and left out."""
    batch_size = batch_size or _batch_size(spec)
    outs: tuple[list[np.ndarray], ...] = ([], [], [])
    kept: list[int] = []
    for start in range(0, len(items), batch_size):
        tried = [(i, _load_or_skip(load, items[i], spec)) for i in range(start, min(start + batch_size, len(items)))]
        loaded = [(i, t) for i, t in tried if t is not None]
        if not loaded:
            continue
        kept += [i for i, _ in loaded]
        for acc, out in zip(outs, encode(np.stack([t for _, t in loaded]))):
            acc.append(out)
    if not kept:
        raise DataError(f"none of the {len(items)} evaluation images could be decoded")
    return (*(np.concatenate(o) for o in outs), np.asarray(kept, dtype=np.int64))


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = KNN_K, temperature: float = KNN_T, num_classes: int | None = None) -> float:
    """Weighted kNN top-1 on cosine similarity (inputs are L2-normalised here)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    tr = torch.nn.functional.normalize(torch.from_numpy(train_x).float(), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test_x).float(), dim=1)
    labels = torch.from_numpy(train_y).long()
    k = min(k, len(tr))
    correct = 0
    for start in range(0, len(te), 1024):
        sim = te[start:start + 1024] @ tr.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, labels[top_idx], weights)
        correct += int((votes.argmax(1) == torch.from_numpy(test_y[start:start + 1024]).long()).sum())
    return correct / len(te)


def linear_probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=500, C=1.0)
    clf.fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def clustering_scores(assignments: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"nmi": float(normalized_mutual_info_score(labels, assignments)),
            "ari": float(adjusted_rand_score(labels, assignments))}


def _encode_split(encode: Encoder, spec: InputSpec, data: LabelledData, items: np.ndarray, labels: np.ndarray):
    """(embeddings, projections, prototype scores, int64 labels, images left out) of one split."""
    emb, proj, scores, kept = encode_images(encode, items, spec, data.load)
    return emb, proj, scores, labels[kept].astype(np.int64), len(items) - len(kept)


ASSIGN_TEMPERATURE = 0.1  # the server's default for /v1/assign probabilities (SwAV's training temperature)


def assignment_scores(scores: np.ndarray, labels: np.ndarray, temperature: float = ASSIGN_TEMPERATURE,
                      largest: int = 10) -> dict:
    """What /v1/assign tells a user: the share of images whose top prototype has probability
    above 0.5 under softmax(scores / T), and the purity (share of the majority class) of the
    `largest` prototypes with the most images."""
    z = (scores - scores.max(axis=1, keepdims=True)) / temperature
    p = np.exp(z)
    top_p = p.max(axis=1) / p.sum(axis=1)
    proto = scores.argmax(axis=1)
    ids, counts = np.unique(proto, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:largest]
    sizes = [int(c) for c in counts[order]]
    purity = [float(np.bincount(labels[proto == k]).max() / size) for k, size in zip(ids[order], sizes)]
    return {"temperature": temperature, "top_probability_above_half": float((top_p > 0.5).mean()),
            "median_top_probability": float(np.median(top_p)),
            "largest_prototypes": {"sizes": sizes, "purity": [round(x, 4) for x in purity],
                                   "mean_purity": float(np.mean(purity)) if purity else 0.0}}


def evaluate_encoder(encode: Encoder, spec: InputSpec, eval_set: EvalSet = EvalSet(), train_size: int = 0,
                     test_size: int = 0, seed: int = 0) -> dict:
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    data = eval_set.load()
    tr_idx = _subset(len(data.train_labels), train_size, seed)
    te_idx = _subset(len(data.test_labels), test_size, seed + 1)
    train_emb, train_proj, _, train_y, tr_lost = _encode_split(encode, spec, data, data.train_items[tr_idx],
                                                               data.train_labels[tr_idx])
    test_emb, test_proj, test_scores, test_y, te_lost = _encode_split(encode, spec, data, data.test_items[te_idx],
                                                                      data.test_labels[te_idx])
    num_classes = len(data.classes)
    if len(test_y) < num_classes:
        raise DataError(f"{len(test_y)} query images are fewer than the {num_classes} classes k-means clusters into")
    kmeans = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(test_emb)
    kmeans_proj = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(test_proj)
    proto = test_scores.argmax(axis=1)
    return {
        "dataset": data.name, "classes": list(data.classes),
        "train_size": len(train_y), "test_size": len(test_y),
        "skipped_unreadable": data.skipped + tr_lost + te_lost,
        "linear_probe_top1": linear_probe_accuracy(train_emb, train_y, test_emb, test_y),
        "knn_top1": knn_accuracy(train_emb, train_y, test_emb, test_y, num_classes=num_classes),
        "knn": {"k": KNN_K, "temperature": KNN_T, "metric": "cosine"},
        "kmeans_embedding": clustering_scores(kmeans, test_y),
        "prototype_assignment": {**clustering_scores(proto, test_y),
                                 "prototypes_used": len(np.unique(proto)),
                                 **assignment_scores(test_scores, test_y)},
        # The same kNN and k-means on the normalised projection: which output serves search better.
        "projection": {"knn_top1": knn_accuracy(train_proj, train_y, test_proj, test_y, num_classes=num_classes),
                       "kmeans": clustering_scores(kmeans_proj, test_y)},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def evaluate_torch(model: SwAVModel, cfg: TrainConfig, train_size: int = 0, test_size: int = 0,
                   eval_set: EvalSet | None = None) -> dict:
    """Evaluate on `eval_set`, by default the one `cfg` names."""
    model.eval()
    return evaluate_encoder(torch_encoder(model, cfg.mean, cfg.std), spec_of(cfg),
                            eval_set or EvalSet.of(cfg.to_dict()), train_size, test_size)


def evaluate_bundle(bundle_dir: str | Path, eval_set: EvalSet | None = None, train_size: int = 0,
                    test_size: int = 0) -> dict:
    """Evaluate a bundle through onnxruntime on `eval_set`, by default the one of its training config."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    try:
        spec = InputSpec.from_manifest(manifest.get("input"))
    except ValueError as e:
        raise ConfigError(f"{bundle_dir}/manifest.json: {e}") from None
    eval_set = eval_set or EvalSet.of(manifest.get("training") or {})
    return evaluate_encoder(onnx_encoder(bundle_dir / manifest["model_file"]), spec, eval_set, train_size, test_size)


def summary(ev: dict) -> str:
    proj = f"projection kNN {ev['projection']['knn_top1']:.4f}, " if "projection" in ev else ""
    return (f"linear {ev['linear_probe_top1']:.4f}, kNN {ev['knn_top1']:.4f}, "
            f"k-means NMI {ev['kmeans_embedding']['nmi']:.4f} ARI {ev['kmeans_embedding']['ari']:.4f}, "
            f"prototype NMI {ev['prototype_assignment']['nmi']:.4f}, {proj}"
            f"({ev['train_size']} train / {ev['test_size']} test, {ev['seconds']} s)")
