"""`swav import` of a checkpoint in the official layout, then `swav serve` on the bundle: /v1/embed,
/v1/assign and /v1/search on real photos equal PyTorch on the server's own preprocessed tensors, and
the server's preprocessing equals the official evaluation transform computed with torchvision."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from repo_tools import REPO, swav_bin  # noqa: F401 (swav_bin is a fixture)

import torch
from PIL import Image
from torchvision import transforms

from swav_train import checkpoint as checkpoints
from swav_train import preprocess
from swav_train.importers import OFFICIAL_MEAN, OFFICIAL_STD, build_model, layouts, synthetic

FIXTURES = REPO / "tests" / "fixtures" / "preprocess"
# A big constant beside the pixels lets the test undo the server's L2 normalisation exactly.
SCALE_MARK = 1.0e4


def photos(tmp_path: Path) -> list[Path]:
    """EXIF-rotated JPEG, a photo, a 16-bit grey PNG, a palette PNG with transparency, and a CMYK JPEG."""
    cmyk = tmp_path / "cmyk.jpg"
    rgb = np.asarray(Image.open(FIXTURES / "photo.jpg").convert("RGB"))
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    return [FIXTURES / "exif_rot6.jpg", FIXTURES / "photo.jpg", FIXTURES / "gray16_33x40.png",
            FIXTURES / "palette_trns.png", cmyk]


def identity_bundle(out: Path, resize: int, crop: int) -> Path:
    """A bundle whose only output is the input tensor itself (plus SCALE_MARK), to read the server's
    preprocessed tensors back through /v1/embed."""
    import onnx
    from onnx import TensorProto, helper

    n = 3 * crop * crop
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "zero", "one", "one"], ["first"]),
        helper.make_node("Mul", ["first", "zero_f"], ["zeros"]),
        helper.make_node("Add", ["zeros", "mark"], ["marks"]),
        helper.make_node("Concat", ["flat", "marks"], ["embedding"], axis=1),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("mark", TensorProto.FLOAT, [], [SCALE_MARK])]
    graph = helper.make_graph(nodes, "identity", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                ["batch", 3, crop, crop])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", n + 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    out.mkdir(parents=True)
    onnx.save(model, str(out / "model.onnx"))
    manifest = {
        "schema_version": 2, "name": "identity", "model_file": "model.onnx",
        "model_sha256": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest(),
        "input": preprocess.InputSpec(3, resize, crop, crop).manifest(OFFICIAL_MEAN, OFFICIAL_STD),
        "outputs": {"embedding": {"name": "embedding", "dim": n + 1}, "projection": None, "prototype_scores": None},
        "num_prototypes": 0,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@contextlib.contextmanager
def serve(binary: Path, bundle: Path, *extra: str):
    proc = subprocess.Popen([str(binary), "serve", "--model", str(bundle), "--listen", "127.0.0.1:0", "--device", "cpu",
                             "--intra-threads", "1", "--max-batch-size", "8", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), f"serve did not start: {line!r} {proc.stderr.read()[-3000:]}"
        base = "http://" + line.split()[-1]
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/ready", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not become ready in 120 s"
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(files: list[Path], ids: list[str] | None = None) -> tuple[bytes, str]:
    boundary = "swavtestboundary"
    out = io.BytesIO()
    for i, f in enumerate(files):
        name = ids[i] if ids else f"image{i}"
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(f.read_bytes() + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def server_tensors(base: str, files: list[Path], crop: int) -> np.ndarray:
    status, body = post(base + "/v1/embed", *multipart(files))
    assert status == 200, body
    vectors = np.asarray(body["embeddings"], dtype=np.float64)
    tensors = vectors[:, :-1] * (SCALE_MARK / vectors[:, -1:])  # undo the L2 normalisation
    return tensors.reshape(len(files), 3, crop, crop).astype(np.float32)


def official_transform(path: Path) -> np.ndarray:
    """torchvision's eval transform (as SwAV's eval_linear.py) on the file decoded by the bundle's rules
    (EXIF orientation, 16-bit to 8-bit, alpha over white, RGB): the steps ImageFolder's plain
    `convert("RGB")` would get wrong for these photos."""
    img = preprocess.to_channels(preprocess.decode(path), 3)
    t = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return t(img).numpy()


def test_server_preprocessing_equals_the_official_eval_transform(swav_bin, tmp_path):
    files = photos(tmp_path)
    with serve(swav_bin, identity_bundle(tmp_path / "identity", 256, 224)) as base:
        got = server_tensors(base, files, 224)
    normalize = transforms.Normalize(OFFICIAL_MEAN, OFFICIAL_STD)
    for f, tensor in zip(files, got):
        want = official_transform(f)
        assert float(np.abs(tensor - want).max()) <= 1 / 255 + 1e-5, f.name
        # ...and after the normalisation the graph applies, within the same 1/255 scaled by 1/std.
        diff = (normalize(torch.from_numpy(tensor)) - normalize(torch.from_numpy(want))).abs().amax(dim=(1, 2))
        assert torch.all(diff <= (1 / 255 + 1e-5) / torch.tensor(OFFICIAL_STD)), f.name


def test_import_then_serve_answers_like_pytorch_on_real_photos(swav_bin, tmp_path):
    checkpoint = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(synthetic.official_state(width=8, hidden=32, feat=16, k=20), checkpoint)
    bundle = tmp_path / "bundle"
    env = {**os.environ, "SWAV_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "training" / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([str(swav_bin), "import", "--", str(checkpoint), "--out", str(bundle),
                             "--external-data", "always"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "found: official SwAV release" in result.stdout
    # The weights live in model.onnx.data, which the server must load (and check).
    assert json.loads((bundle / "manifest.json").read_text())["model_data"]["file"] == "model.onnx.data"

    files = photos(tmp_path)
    with serve(swav_bin, identity_bundle(tmp_path / "identity", 256, 224)) as base:
        tensors = server_tensors(base, files, 224)
    model = build_model(layouts.detect(checkpoints.read(checkpoint), checkpoint))
    with torch.no_grad():
        emb, proj, scores = (t.numpy() for t in model(torch.from_numpy(tensors)))

    ids = [f"photo{i}" for i in range(len(files))]
    with serve(swav_bin, bundle, "--index", str(tmp_path / "index")) as base:
        status, body = post(base + "/v1/embed", *multipart(files))
        assert status == 200 and body["dim"] == 256
        assert float(np.abs(np.asarray(body["embeddings"]) - emb).max()) <= 1e-4
        status, body = post(base + "/v1/embed?output=projection", *multipart(files))
        assert status == 200 and float(np.abs(np.asarray(body["embeddings"]) - proj).max()) <= 1e-4
        status, body = post(base + "/v1/assign?top_k=3", *multipart(files))
        assert status == 200
        probs = torch.softmax(torch.from_numpy(scores) / 0.1, dim=1).numpy()
        for i, a in enumerate(body["assignments"]):
            assert a["cluster"] == int(np.argmax(scores[i])) and abs(a["score"] - scores[i].max()) <= 1e-4
            for top in a["top"]:
                assert abs(top["probability"] - probs[i, top["cluster"]]) <= 1e-4

        status, body = post(base + "/v1/items", *multipart(files, ids))
        assert status == 200 and body["added"] == len(files), body
        status, body = post(base + f"/v1/search?k={len(files)}", *multipart(files[1:2]))
        assert status == 200, body
        hits = body["results"][0]
        assert hits[0]["id"] == "photo1"
        for hit in hits:
            j = ids.index(hit["id"])
            assert abs(hit["score"] - float(emb[1] @ emb[j])) <= 1e-4, hit
        with urllib.request.urlopen(base + "/v1/clusters", timeout=30) as r:
            clusters = json.loads(r.read())["clusters"]
        assert sum(c["size"] for c in clusters) == len(files)
        assert {c["id"] for c in clusters} == {int(np.argmax(s)) for s in scores}
