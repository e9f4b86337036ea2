"""Data sources: any folder of images (recursive, unlabelled), labelled folders
(ROOT/<class>/<image>, for evaluation) and Fashion-MNIST IDX files."""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from swav_train import preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(RuntimeError):
    """The data cannot be used; the message names the path and the reason."""


# ---- image folders ---------------------------------------------------------

def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def scan_folder(root: str | Path, what: str = "data folder") -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under `root` (recursive, sorted) whose header PIL can read,
    and the (path, reason) of those it cannot. `what` names the folder in errors."""
    root = Path(root)
    if not str(root):
        raise DataError(f"no {what} given (use --data-dir DIR)")
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory")
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    good, bad = [], []
    for path in candidates:
        try:
            with Image.open(path):  # opening parses the header, which is all this checks
                pass
            good.append(path)
        except Exception as e:  # PIL raises several types for bad files
            bad.append((path, _reason(e)))
    for path, why in bad:
        log.warning("skipping unreadable image %s (%s)", path, why)
    if not good:
        detail = f"; {len(bad)} file(s) could not be read, e.g. {bad[0][0]} ({bad[0][1]})" if bad else ""
        raise DataError(f"no readable images found in {root} (searched recursively for "
                        f"{', '.join(IMAGE_SUFFIXES)}){detail}")
    return good, bad


class ImageFolderDataset(Dataset):
    """Every readable image under a folder; a file that fails to decode later is
    reported once and replaced by the next readable one."""

    def __init__(self, root: str | Path, channels: int, transform: Callable | None = None, max_images: int = 0):
        self.paths, self.skipped = scan_folder(root)
        if max_images:
            self.paths = self.paths[:max_images]
        self.channels = channels
        self.transform = transform
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                return preprocess.to_channels(preprocess.decode(self.paths[i]), self.channels)
            except Exception as e:
                if i not in self._reported:
                    self._reported.add(i)
                    log.warning("skipping unreadable image %s (%s)", self.paths[i], _reason(e))
        raise DataError(f"none of the {len(self.paths)} images could be decoded")

    def __getitem__(self, index: int):
        img = self.load(index)
        return self.transform(img) if self.transform else img


# ---- labelled image folders (evaluation) ------------------------------------

@dataclass(frozen=True)
class LabelledFolder:
    """ROOT/<class>/<image>: the readable images, their label ids (indices into the
    sorted class names) and the (path, reason) of the files skipped as unreadable."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray
    skipped: tuple[tuple[Path, str], ...]


def _class_names(root: Path) -> tuple[str, ...]:
    # Hidden folders (.git, .ipynb_checkpoints) are tooling, not classes.
    return tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))


def scan_labelled_folder(root: str | Path) -> LabelledFolder:
    """Every readable image under ROOT/<class>/ (searched recursively), labelled by its class folder."""
    root = Path(root)
    paths, skipped = scan_folder(root, what="labelled folder")
    classes = _class_names(root)
    if len(classes) < 2:
        raise DataError(f"labelled folder {root} needs at least 2 class subfolders (ROOT/<class>/<image>), "
                        f"found {len(classes)}: {', '.join(classes) or 'none'}")
    index = {name: i for i, name in enumerate(classes)}
    kept, labels, loose = [], [], []
    for path in paths:
        top = path.relative_to(root).parts[0]
        if top in index and path.parent != root:
            kept.append(path)
            labels.append(index[top])
        else:
            loose.append(path)
    if loose:
        log.warning("ignoring %d image(s) of %s outside its class folders, e.g. %s", len(loose), root, loose[0])
    present = set(labels)
    empty = [name for name, i in index.items() if i not in present]
    if empty:
        raise DataError(f"class folder(s) of {root} without readable images: {', '.join(empty)}")
    return LabelledFolder(root, classes, tuple(kept), np.asarray(labels, dtype=np.int64), tuple(skipped))


def labelled_folder_pair(train_root: str | Path, test_root: str | Path) -> tuple[LabelledFolder, LabelledFolder]:
    """The reference and query folders; their class sets must match, or label ids would differ."""
    train, test = scan_labelled_folder(train_root), scan_labelled_folder(test_root)
    if train.classes != test.classes:
        parts = [f"missing from {where.root}: {', '.join(sorted(set(other.classes) - set(where.classes)))}"
                 for where, other in ((test, train), (train, test))
                 if set(other.classes) - set(where.classes)]
        raise DataError(f"the labelled folders {train.root} and {test.root} have different classes; "
                        + "; ".join(parts))
    return train, test


# ---- Fashion-MNIST ---------------------------------------------------------

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file {path} does not exist (Debian package dataset-fashion-mnist, "
                        "or pass --fashion-mnist-dir)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) for split 'train' or 't10k'."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} does not exist")

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).exists():
                return root / name
        return root / f"{stem}.gz"

    images = _read_idx(find(f"{split}-images-idx3-ubyte"))
    labels = _read_idx(find(f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {root} do not match (images {images.shape}, labels {labels.shape})")
    return images, labels


class ArrayImageDataset(Dataset):
    """uint8 grayscale arrays (N x H x W) as PIL images in the model's channel mode."""

    def __init__(self, images: np.ndarray, channels: int, transform: Callable | None = None,
                 labels: np.ndarray | None = None):
        self.images, self.labels = images, labels
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return preprocess.to_channels(Image.fromarray(self.images[index], mode="L"), self.channels)

    def __getitem__(self, index: int):
        img = self.load(index)
        return self.transform(img) if self.transform else img


def training_dataset(dataset: str, data_dir: str, fashion_mnist_dir: str, channels: int,
                     transform: Callable, max_images: int = 0) -> tuple[ArrayImageDataset | ImageFolderDataset, dict]:
    """The unlabelled training set and a description of it for the manifest."""
    if dataset == "fashion-mnist":
        images, _ = load_fashion_mnist(fashion_mnist_dir, "train")
        if max_images:
            images = images[:max_images]
        return ArrayImageDataset(images, channels, transform), {"name": "fashion-mnist", "num_images": len(images)}
    ds = ImageFolderDataset(data_dir, channels, transform, max_images)
    return ds, {"name": "folder", "path": str(Path(data_dir).resolve()), "num_images": len(ds),
                "skipped_unreadable": len(ds.skipped)}
