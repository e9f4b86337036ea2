"""train -> export -> onnxruntime parity -> manifest, through the command line."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from conftest import free_port, make_images, tiny_config
from swav_train import checkpoint, cli, preprocess
from swav_train.evaluate import spec_of
from swav_train.model import InferenceModel


def _tiny_run_config(tmp_path, folder, **changes) -> Path:
    path = tmp_path / "tiny.json"
    tiny_config(data_dir=str(folder), **changes).save(path)
    return path


def test_train_export_parity_manifest(tmp_path, fashion_mnist_dir):
    folder = make_images(tmp_path / "images", 32)
    (folder / "part0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = tmp_path / "run"
    cfg_path = _tiny_run_config(tmp_path, folder, fashion_mnist_dir=str(fashion_mnist_dir))
    assert cli.main(["train", "--config", str(cfg_path), "--out", str(run), "--evaluate",
                     "--eval-train-size", "300", "--eval-test-size", "100"]) == 0

    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "eval.json", "tensorboard"):
        assert (run / name).exists(), name
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    onnx_bytes = (bundle / "model.onnx").read_bytes()
    assert manifest["schema_version"] == 2
    assert manifest["model_file"] == "model.onnx"
    assert manifest["model_sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert len(manifest["model_sha256"]) == 64
    inp = manifest["input"]
    assert (inp["name"], inp["layout"], inp["dtype"], inp["channels"], inp["height"], inp["width"]) == \
        ("images", "NCHW", "float32", 3, 16, 16)
    assert inp["resize"] == {"method": "shorter_side", "size": 16, "interpolation": "bilinear", "antialias": True}
    assert inp["crop"] == {"method": "center", "height": 16, "width": 16} and inp["alpha"] == "composite_white"
    assert {k: v["dim"] for k, v in manifest["outputs"].items()} == {"embedding": 16, "projection": 8,
                                                                     "prototype_scores": 6}
    assert manifest["num_prototypes"] == 6 and manifest["backbone"] == "resnet18"
    assert manifest["dataset"]["num_images"] == 32 and manifest["dataset"]["skipped_unreadable"] == 1
    assert manifest["training"]["nmb_prototypes"] == 6
    assert manifest["golden"] == "golden/golden.json"
    train_golden = json.loads((bundle / "golden" / "golden.json").read_text())["cases"]
    assert len(train_golden) == 4 and all((bundle / "golden" / c["file"]).is_file() for c in train_golden)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["onnxruntime_version"] == ort.__version__
    ev = manifest["evaluation"]
    assert ev == json.loads((run / "eval.json").read_text())
    assert ev["train_size"] == 300 and ev["test_size"] == 100
    # Both accuracies count right answers among the 100 queries, and both are well above chance
    # (10 classes: 0.1; at least 18 of 100 right by chance has probability 0.01): even this barely
    # trained net's features separate Fashion-MNIST's classes (measured: kNN 0.26, linear 0.24),
    # while an evaluation that paired images with the wrong labels would land at chance.
    for name in ("knn_top1", "linear_probe_top1"):
        right = ev[name] * ev["test_size"]
        assert abs(right - round(right)) < 1e-6 and 18 <= round(right) <= 100, (name, ev[name])
    assert set(ev["kmeans_embedding"]) == {"nmi", "ari"}

    # onnxruntime against PyTorch, on real preprocessed files and two batch sizes (dynamic axis).
    model, cfg, _ = checkpoint.model_from_checkpoint(run / "checkpoint.pt")
    wrapper = InferenceModel(model, cfg.mean, cfg.std).eval()
    files = sorted(folder.rglob("img*.png"))[:5]
    batch = np.stack([preprocess.load_array(f, spec_of(cfg)) for f in files])
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embedding", "projection", "prototype_scores"]
    for n in (1, 5):
        got = session.run(None, {"images": batch[:n]})
        with torch.no_grad():
            want = [t.numpy() for t in wrapper(torch.from_numpy(batch[:n]))]
        for g, w in zip(got, want):
            assert g.shape == w.shape and float(np.abs(g - w).max()) <= 1e-4

    # export from the checkpoint, with golden cases
    out = tmp_path / "exported"
    gold = [files[0], tmp_path / "odd.png"]
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 50, 4), dtype=np.uint8), mode="RGBA").save(gold[1])
    assert cli.main(["export", str(run / "checkpoint.pt"), "--out", str(out), "--golden", *map(str, gold)]) == 0
    golden = json.loads((out / "golden" / "golden.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["golden"] == "golden/golden.json"
    assert [c["file"] for c in golden["cases"]] == [files[0].name, "odd.png"]
    assert [c["needs_resize"] for c in golden["cases"]] == [True, True]
    for case, src in zip(golden["cases"], gold):
        assert (out / "golden" / case["file"]).read_bytes() == src.read_bytes()
        tensor = preprocess.load_array(src, spec_of(cfg))
        np.testing.assert_allclose(case["tensor"], tensor.reshape(-1), rtol=0, atol=1e-7)
        emb = session.run(None, {"images": tensor[None]})[0][0]
        np.testing.assert_allclose(case["embedding"], emb, atol=1e-4)

    # eval of the bundle (onnxruntime) agrees with eval of the checkpoint (PyTorch)
    assert cli.main(["eval", str(out), "--eval-train-size", "300", "--eval-test-size", "100",
                     "--fashion-mnist-dir", str(fashion_mnist_dir)]) == 0
    bundle_eval = json.loads((out / "manifest.json").read_text())["evaluation"]
    assert abs(bundle_eval["knn_top1"] - ev["knn_top1"]) <= 0.02


def test_torchrun_two_processes_train_and_export(tmp_path):
    folder = make_images(tmp_path / "images", 32)
    cfg_path = _tiny_run_config(tmp_path, folder, epochs=1, warmup_epochs=0, batch_size=4)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "swav_train", "train", "--config", str(cfg_path),
           "--out", str(run), "--no-evaluate"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "rank0.pt").exists() and (run / "rank1.pt").exists()
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["epoch"] == 1
    # 32 images / (4 per rank x 2 ranks) = 4 steps per epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 3
    assert json.loads((run / "bundle" / "manifest.json").read_text())["schema_version"] == 2
