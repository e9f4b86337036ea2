"""Which of a bundle's features serves kNN best, chosen on the training set.

The bundle's weights are read back into PyTorch (`bundle_model`), and Fashion-MNIST's 60,000 training
and 10,000 test images, preprocessed as the server does at the bundle's input size, go through its
backbone. From the outputs of ResNet stages 3 and 4 it forms candidate embeddings: global average
pooling (the stage-4 one is what a bundle exports by default, the baseline), global max pooling,
GeM pooling (p 3; Radenović et al. 2018), average pooling onto a 2x2 grid, and stage 3 and 4 side by
side. For each it prints the weighted kNN of evaluate.py (k 20, T 0.07) twice: on a validation split
(10,000 training images as queries against the other 50,000; what a choice may be made on) and on the
test set against all 60,000 (what is reported), then, for the candidates of --full, the linear probe
and k-means NMI on the test set as evaluate.py measures them. Raw pixels are the floor.

    PYTHONPATH=training/src .venv/bin/python training/benchmarks/embedding_layer.py --bundle models/fashion-mnist
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from swav_train.bundle_model import model_from_bundle
from swav_train.config import FASHION_MNIST_DIR
from swav_train.data import load_fashion_mnist
from swav_train.evaluate import clustering_scores, knn_accuracy, linear_probe_accuracy
from swav_train.preprocess import InputSpec, to_array


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def stage_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bb = model.backbone
    x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
    l3 = bb.layer3(bb.layer2(bb.layer1(x)))
    return l3, bb.layer4(l3)


def candidates(l3: torch.Tensor, l4: torch.Tensor) -> dict[str, torch.Tensor]:
    def gem(m: torch.Tensor) -> torch.Tensor:
        return m.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)

    return {
        "stage 4 avg (baseline)": l4.mean((2, 3)),
        "stage 4 max": l4.amax((2, 3)),
        "stage 4 GeM": gem(l4),
        "stage 4 2x2 grid": F.adaptive_avg_pool2d(l4, 2).flatten(1),
        "stage 3 avg": l3.mean((2, 3)),
        "stage 3 max": l3.amax((2, 3)),
        "stage 3 GeM": gem(l3),
        "stage 3 2x2 grid": F.adaptive_avg_pool2d(l3, 2).flatten(1),
        # each part normalised, so that neither stage's scale decides
        "stages 3 + 4 avg": torch.cat([F.normalize(l3.mean((2, 3)), dim=1), F.normalize(l4.mean((2, 3)), dim=1)], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("models/fashion-mnist"))
    p.add_argument("--data", default=FASHION_MNIST_DIR)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full", nargs="*", default=["stage 4 avg (baseline)", "stage 3 avg", "stage 3 GeM",
                                                 "stage 3 2x2 grid"], metavar="NAME",
                   help="candidates that also get the linear probe and k-means NMI")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg, manifest = model_from_bundle(args.bundle)
    spec = InputSpec.from_manifest(manifest["input"])
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    train_x, train_y = load_fashion_mnist(args.data, "train")
    test_x, test_y = load_fashion_mnist(args.data, "t10k")
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    split = np.random.default_rng(0).permutation(len(train_y))
    val, ref = split[:10_000], split[10_000:]

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, len(images), 500):
                batch = np.stack([to_array(Image.fromarray(im), spec) for im in images[start:start + 500]])
                l3, l4 = stage_maps(model, (torch.from_numpy(batch) - mean) / std)
                for name, f in candidates(l3, l4).items():
                    out.setdefault(name, []).append(f.numpy())
        return {k: unit(np.concatenate(v)) for k, v in out.items()}

    t = time.perf_counter()
    train_f, test_f = features(train_x), features(test_x)
    print(f"bundle {args.bundle} at {spec.height}x{spec.width}; {time.perf_counter() - t:.0f} s to embed 70,000 "
          "images; kNN k=20 T=0.07; validation: 10,000 training images against the other 50,000")
    px_tr = unit(train_x.reshape(len(train_x), -1).astype(np.float32))
    px_te = unit(test_x.reshape(len(test_x), -1).astype(np.float32))
    rows = {"raw pixels (floor)": (px_tr, px_te), **{k: (train_f[k], test_f[k]) for k in train_f}}
    print(f"{'features':>24} {'dim':>5} | {'val kNN':>8} {'test kNN':>8} | {'linear':>7} {'NMI':>6}")
    from sklearn.cluster import KMeans

    for name, (tr, te) in rows.items():
        v = knn_accuracy(tr[ref], train_y[ref], tr[val], train_y[val])
        s = knn_accuracy(tr, train_y, te, test_y)
        extra = ""
        if name in args.full or name.startswith("raw"):
            lin = linear_probe_accuracy(tr, train_y, te, test_y)
            nmi = clustering_scores(KMeans(10, n_init=10, random_state=0).fit_predict(te), test_y)["nmi"]
            extra = f" | {lin:7.4f} {nmi:6.3f}"
        print(f"{name:>24} {tr.shape[1]:5d} | {v:8.4f} {s:8.4f}{extra}", flush=True)


if __name__ == "__main__":
    main()
