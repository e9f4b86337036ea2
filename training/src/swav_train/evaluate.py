"""Frozen-feature evaluation on a labelled set (default: Fashion-MNIST test against train).

- linear probe: multinomial logistic regression (scikit-learn, lbfgs, C=1) on the
  standardised L2-normalised pooled features of the train split, top-1 on test;
- weighted kNN (k=20, cosine, T=0.07; InstDisc/DINO weights exp(sim/T) summed per class);
- NMI and ARI of k-means (k = number of classes, 10 restarts) on the test embeddings,
  and of the prototype argmax assignments.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from swav_train import preprocess
from swav_train.config import FASHION_MNIST_DIR, TrainConfig
from swav_train.data import load_fashion_mnist
from swav_train.model import InferenceModel, SwAVModel
from swav_train.preprocess import InputSpec

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
KNN_K, KNN_T = 20, 0.07


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


def encode_images(encode: Encoder, images: np.ndarray, spec: InputSpec, batch_size: int = 512):
    """Encode uint8 H x W grayscale arrays through the bundle preprocessing rule."""
    outs = [[], [], []]
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = np.stack([preprocess.to_array(Image.fromarray(a), spec) for a in chunk])
        for acc, out in zip(outs, encode(batch)):
            acc.append(out)
    return tuple(np.concatenate(o) for o in outs)


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


def evaluate_encoder(encode: Encoder, spec: InputSpec, fashion_mnist_dir: str = FASHION_MNIST_DIR,
                     train_size: int = 0, test_size: int = 0, seed: int = 0) -> dict:
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    train_images, train_labels = load_fashion_mnist(fashion_mnist_dir, "train")
    test_images, test_labels = load_fashion_mnist(fashion_mnist_dir, "t10k")
    tr_idx, te_idx = _subset(len(train_images), train_size, seed), _subset(len(test_images), test_size, seed + 1)
    train_y, test_y = train_labels[tr_idx].astype(np.int64), test_labels[te_idx].astype(np.int64)
    train_emb, _, _ = encode_images(encode, train_images[tr_idx], spec)
    test_emb, _, test_scores = encode_images(encode, test_images[te_idx], spec)
    num_classes = 10
    kmeans = KMeans(n_clusters=num_classes, n_init=10, random_state=seed).fit_predict(test_emb)
    proto = test_scores.argmax(axis=1)
    return {
        "dataset": "fashion-mnist", "train_size": int(len(tr_idx)), "test_size": int(len(te_idx)),
        "linear_probe_top1": linear_probe_accuracy(train_emb, train_y, test_emb, test_y),
        "knn_top1": knn_accuracy(train_emb, train_y, test_emb, test_y, num_classes=num_classes),
        "knn": {"k": KNN_K, "temperature": KNN_T, "metric": "cosine"},
        "kmeans_embedding": clustering_scores(kmeans, test_y),
        "prototype_assignment": {**clustering_scores(proto, test_y),
                                 "prototypes_used": int(len(np.unique(proto)))},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def evaluate_torch(model: SwAVModel, cfg: TrainConfig, train_size: int = 0, test_size: int = 0) -> dict:
    model.eval()
    return evaluate_encoder(torch_encoder(model, cfg.mean, cfg.std), spec_of(cfg), cfg.fashion_mnist_dir,
                            train_size, test_size)


def evaluate_bundle(bundle_dir: str | Path, fashion_mnist_dir: str = FASHION_MNIST_DIR, train_size: int = 0,
                    test_size: int = 0) -> dict:
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    inp = manifest["input"]
    spec = InputSpec(inp["channels"], inp["resize"]["size"], inp["height"], inp["width"])
    return evaluate_encoder(onnx_encoder(bundle_dir / manifest["model_file"]), spec, fashion_mnist_dir,
                            train_size, test_size)


def summary(ev: dict) -> str:
    return (f"linear {ev['linear_probe_top1']:.4f}, kNN {ev['knn_top1']:.4f}, "
            f"k-means NMI {ev['kmeans_embedding']['nmi']:.4f} ARI {ev['kmeans_embedding']['ari']:.4f}, "
            f"prototype NMI {ev['prototype_assignment']['nmi']:.4f} "
            f"({ev['train_size']} train / {ev['test_size']} test, {ev['seconds']} s)")
