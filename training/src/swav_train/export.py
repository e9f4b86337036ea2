"""The model bundle (docs/bundle.md): ONNX export, onnxruntime parity check, manifest, golden fixtures."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from swav_train import preprocess
from swav_train.config import TrainConfig
from swav_train.evaluate import spec_of
from swav_train.model import InferenceModel, SwAVModel

# 2: `projection` and `prototype_scores` may be null, `centroid_scores` and `model_data` were added.
SCHEMA_VERSION = 2
GOLDEN_SCHEMA_VERSION = 1
OPSET = 18
OUTPUT_NAMES = ("embedding", "projection", "prototype_scores")
PARITY_TOLERANCE = 1e-4
FP16_MIN_COSINE = 0.999
# Float tensors with fewer elements stay float32 under --fp16 (mean, std): nothing to gain.
FP16_MIN_ELEMENTS = 64
DATA_FILE_SUFFIX = ".data"


class ExportError(RuntimeError):
    """The exported graph disagrees with PyTorch, or cannot be written."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(wrapper: torch.nn.Module, channels: int, size: int, path: Path,
                output_names: tuple[str, ...] = OUTPUT_NAMES, external_data: bool = False) -> None:
    """`external_data` writes the weights to PATH.data, which models over protobuf's 2 GB limit need."""
    wrapper.eval()
    example = torch.rand(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), input_names=["images"], output_names=list(output_names), opset_version=OPSET,
            dynamo=True, external_data=external_data, dynamic_shapes={"images": {0: batch}}, verbose=False)
    if program is None:  # only the legacy exporter (dynamo=False) returns nothing
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=external_data)


def run_onnx(model_path: Path, batch: np.ndarray, output_names: tuple[str, ...]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(list(output_names), {"images": batch})


def parity_check(wrapper: torch.nn.Module, model_path: Path, batch: np.ndarray,
                 output_names: tuple[str, ...] = OUTPUT_NAMES) -> float:
    """Max abs difference between onnxruntime and PyTorch over all outputs; raises above tolerance."""
    got = run_onnx(model_path, batch, output_names)
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(torch.from_numpy(batch))]
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ExportError(f"onnxruntime disagrees with PyTorch on {model_path}: max abs diff {diff:.3g} "
                          f"> {PARITY_TOLERANCE}")
    return diff


def min_row_cosine(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The smallest cosine between matching rows of matching outputs."""
    worst = 1.0
    for g, w in zip(got, want):
        g, w = g.astype(np.float64), w.astype(np.float64)
        norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
        cos = np.sum(g * w, axis=1) / np.maximum(norms, 1e-30)
        worst = min(worst, float(np.min(cos)) if np.all(np.isfinite(cos)) else float("nan"))
    return worst


def weights_to_fp16(model) -> int:
    """Stores every float32 initializer of at least FP16_MIN_ELEMENTS values as float16, followed by a
    Cast back to float32: the file halves, the graph still computes in float32 (onnxruntime's CPU
    kernels are float32) and takes and returns float32. Returns the number of tensors converted."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_ELEMENTS:
            kept.append(init)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
        kept.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                           name=init.name + "__to_fp32"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return len(casts)


def initializer_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def save_onnx(model, path: Path, external: bool) -> Path | None:
    """Writes `model` to `path`; with `external`, its weights go to PATH.data (returned)."""
    import onnx

    data = path.with_name(path.name + DATA_FILE_SUFFIX)
    data.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return data
    onnx.save_model(model, str(path))
    return None


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
    doc = {"schema_version": GOLDEN_SCHEMA_VERSION, "cases": cases}
    (golden_dir / "golden.json").write_text(json.dumps(doc) + "\n")
    return doc


def _write_manifest(path: Path, manifest: dict) -> None:
    # Through a temporary file and a rename: a reader never sees half a manifest.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def record_evaluation(bundle_dir: str | Path, evaluation: dict) -> None:
    """Store `evaluation` in BUNDLE_DIR/manifest.json, leaving everything else as it is."""
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["evaluation"] = evaluation
    _write_manifest(path, manifest)


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
    emb_dim = model.embedding_dim
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
        "model_data": None,
    }
    _write_manifest(out_dir / "manifest.json", manifest)
    return out_dir
