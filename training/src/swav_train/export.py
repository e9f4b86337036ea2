"""The model bundle (docs/bundle.md): ONNX export, onnxruntime parity check, manifest, golden fixtures."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from swav_train import preprocess
from swav_train.config import TrainConfig
from swav_train.evaluate import spec_of
from swav_train.model import InferenceModel, SwAVModel

SCHEMA_VERSION = 1
OPSET = 18
OUTPUT_NAMES = ("embedding", "projection", "prototype_scores")
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph disagrees with PyTorch, or cannot be written."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(wrapper: InferenceModel, channels: int, size: int, path: Path) -> None:
    wrapper.eval()
    example = torch.rand(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), input_names=["images"], output_names=list(OUTPUT_NAMES), opset_version=OPSET,
            dynamo=True, external_data=False, dynamic_shapes={"images": {0: batch}}, verbose=False)
    program.save(str(path), external_data=False)


def parity_check(wrapper: InferenceModel, model_path: Path, batch: np.ndarray) -> float:
    """Max abs difference between onnxruntime and PyTorch over all outputs; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {"images": batch})
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(torch.from_numpy(batch))]
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ExportError(f"onnxruntime disagrees with PyTorch on {model_path}: max abs diff {diff:.3g} "
                          f"> {PARITY_TOLERANCE}")
    return diff


def write_golden(wrapper: InferenceModel, spec: preprocess.InputSpec, files: list[Path], golden_dir: Path) -> dict:
    """Copy `files` into golden/ and record the trainer's tensor and PyTorch's outputs for each."""
    golden_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    used: set[str] = set()
    for i, src in enumerate(files):
        name = src.name if src.name not in used else f"{i:02d}_{src.name}"  # same name in two folders
        used.add(name)
        dst = golden_dir / name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        decoded = preprocess.decode(dst)
        tensor = preprocess.to_array(decoded, spec)
        with torch.no_grad():
            emb, proj, scores = (t[0].tolist() for t in wrapper(torch.from_numpy(tensor[None])))
        cases.append({"file": dst.name,
                      "needs_resize": preprocess.needs_resize(preprocess.to_channels(decoded, spec.channels), spec),
                      "tensor": tensor.reshape(-1).tolist(), "embedding": emb, "projection": proj,
                      "prototype_scores": scores})
    doc = {"schema_version": SCHEMA_VERSION, "cases": cases}
    (golden_dir / "golden.json").write_text(json.dumps(doc) + "\n")
    return doc


def export_bundle(model: SwAVModel, cfg: TrainConfig, out_dir: str | Path, *, dataset: dict | None = None,
                  evaluation: dict | None = None, golden_files: list[Path] | None = None,
                  parity_batch: np.ndarray | None = None) -> Path:
    """Write OUT_DIR/{model.onnx, manifest.json[, golden/]}; returns OUT_DIR."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    wrapper = InferenceModel(model, cfg.mean, cfg.std).eval()
    spec = spec_of(cfg)
    model_path = out_dir / "model.onnx"
    export_onnx(wrapper, cfg.channels, cfg.image_size, model_path)
    if parity_batch is None:
        parity_batch = np.random.default_rng(0).random((4, cfg.channels, cfg.image_size, cfg.image_size),
                                                       dtype=np.float32)
    import onnxruntime as ort

    diff = parity_check(wrapper, model_path, parity_batch)
    golden = None
    if golden_files:
        write_golden(wrapper, spec, [Path(f) for f in golden_files], out_dir / "golden")
        golden = "golden/golden.json"
    emb_dim = model.backbone.out_dim
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.bundle_name,
        "description": cfg.description or f"SwAV {cfg.arch} (width {cfg.width}) trained on {cfg.dataset}",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
        "input": spec.manifest(cfg.mean, cfg.std),
        "outputs": {
            "embedding": {"name": "embedding", "dim": emb_dim},
            "projection": {"name": "projection", "dim": cfg.feat_dim},
            "prototype_scores": {"name": "prototype_scores", "dim": cfg.nmb_prototypes},
        },
        "num_prototypes": cfg.nmb_prototypes,
        "backbone": cfg.arch,
        "training": cfg.to_dict(),
        "dataset": dataset or {"name": cfg.dataset},
        "evaluation": evaluation,
        "parity": {"onnxruntime_version": ort.__version__, "max_abs_diff": diff},
        "golden": golden,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
