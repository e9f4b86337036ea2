"""Which input size to serve a bundle at, and what else test time can buy, chosen on the training set.

For each RESIZE:CROP (shorter side to RESIZE, centre crop CROP) the bundle's graph, with its input
height and width made free, embeds Fashion-MNIST's 60,000 training and 10,000 test images. The
weighted kNN of evaluate.py (k 20, T 0.07) is measured twice: on a validation split (10,000 training
images as queries against the other 50,000; what a choice may be made on) and on the test set against
all 60,000 (what is reported). Then, on the sizes of --extras: the mean of an image's and its mirror
image's embeddings, and PCA whitening of the embedding (fitted on the reference images only), with
raw pixels whitened onto as many components as the embedding has, as their baseline, and k-means NMI on the test set.

    .venv/bin/python training/benchmarks/test_time_size.py --bundle models/fashion-mnist \\
        --sizes 28:28 30:28 32:28 30:30 31:31 32:32 33:33 34:32 34:34 36:36 --extras 28:28 32:32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from swav_train.config import FASHION_MNIST_DIR
from swav_train.data import load_fashion_mnist
from swav_train.evaluate import clustering_scores, encode_images, knn_accuracy
from swav_train.preprocess import InputSpec


def free_size_session(bundle: Path, threads: int):
    import onnx
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(str(bundle / manifest["model_file"]))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    del model.graph.value_info[:]  # shapes inferred for the old size
    path = Path(tempfile.mkdtemp()) / "free.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, manifest["input"]["channels"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def whitening(fit: np.ndarray, dims: int | None = None):
    """x -> unit((x - mean) W), W the PCA whitening of `fit` onto its first `dims` components."""
    mean = fit.mean(0)
    _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
    w = (vt.T / np.maximum(s, 1e-12 * s[0]))[:, :dims]
    return lambda x: unit((x - mean) @ w).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("models/fashion-mnist"))
    p.add_argument("--data", default=FASHION_MNIST_DIR)
    p.add_argument("--sizes", nargs="+", default=["28:28", "32:32"], metavar="RESIZE:CROP")
    p.add_argument("--extras", nargs="*", default=[], metavar="RESIZE:CROP",
                   help="sizes (among --sizes) that also get the mirror-image mean and whitening")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    session, channels = free_size_session(args.bundle, args.threads)
    train_x, train_y = load_fashion_mnist(args.data, "train")
    test_x, test_y = load_fashion_mnist(args.data, "t10k")
    train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
    split = np.random.default_rng(0).permutation(len(train_y))
    val, ref = split[:10_000], split[10_000:]

    def knn(tr: np.ndarray, te: np.ndarray, fit=None) -> tuple[float, float]:
        """(validation, test) kNN; `fit(reference)` gives a transform to apply first."""
        t = fit(tr[ref]) if fit else (lambda x: x)
        v = knn_accuracy(t(tr[ref]), train_y[ref], t(tr[val]), train_y[val])
        t = fit(tr) if fit else (lambda x: x)
        return v, knn_accuracy(t(tr), train_y, t(te), test_y)

    def embed(spec: InputSpec, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
        def run(batch):
            return tuple(session.run(["embedding", "projection", "prototype_scores"],
                                     {"images": np.ascontiguousarray(batch[..., ::-1]) if mirror else batch}))
        return tuple(unit(encode_images(run, x, spec)[0]) for x in (train_x, test_x))

    print(f"bundle {args.bundle}; kNN k=20 T=0.07; validation: 10,000 training images against the other 50,000")
    print(f"{'input':>16} | {'val kNN':>8} {'test kNN':>8}")
    found = {}
    for size in args.sizes:
        resize, crop = (int(v) for v in size.split(":"))
        found[size] = embed(InputSpec(channels, resize, crop, crop), mirror=False)
        v, t = knn(*found[size])
        print(f"{size:>16} | {v:8.4f} {t:8.4f}", flush=True)

    from sklearn.cluster import KMeans

    def nmi(te: np.ndarray) -> float:
        return clustering_scores(KMeans(10, n_init=10, random_state=0).fit_predict(te), test_y)["nmi"]

    for size in args.extras:
        resize, crop = (int(v) for v in size.split(":"))
        tr, te = found[size]
        mtr, mte = embed(InputSpec(channels, resize, crop, crop), mirror=True)
        v, t = knn(unit(tr + mtr), unit(te + mte))
        print(f"{size + ' + mirror':>16} | {v:8.4f} {t:8.4f}   (two passes per image)", flush=True)
        v, t = knn(tr, te, fit=whitening)
        print(f"{size + ' whitened':>16} | {v:8.4f} {t:8.4f}   k-means NMI {nmi(whitening(tr)(te)):.3f} "
              f"(unwhitened {nmi(te):.3f})", flush=True)
    if args.extras:
        px_tr = train_x.reshape(len(train_x), -1).astype(np.float32) / 255
        px_te = test_x.reshape(len(test_x), -1).astype(np.float32) / 255
        v, t = knn(px_tr, px_te)
        print(f"{'pixels':>16} | {v:8.4f} {t:8.4f}")
        dims = found[args.extras[0]][0].shape[1]
        v, t = knn(px_tr, px_te, fit=lambda f: whitening(f, dims))
        print(f"{'pixels whitened':>16} | {v:8.4f} {t:8.4f}   (onto {dims} components, the embedding's size)")


if __name__ == "__main__":
    main()
