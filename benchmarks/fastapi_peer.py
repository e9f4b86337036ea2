"""The benchmark's peer: a minimal FastAPI + onnxruntime server doing swav's /v1/embed work
(decode, EXIF, colour, shorter-side resize, centre crop, infer, JSON). Written only for the benchmark.

Run: python benchmarks/fastapi_peer.py --model BUNDLE --port 8099 --threads 2
"""
import argparse
import io
import json
import pathlib

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from PIL import Image, ImageOps


def build_app(bundle: pathlib.Path, threads: int) -> FastAPI:
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["input"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle / manifest["model_file"]), opts, providers=["CPUExecutionProvider"])
    mode = "L" if spec["channels"] == 1 else "RGB"
    size, crop_h, crop_w = spec["resize"]["size"], spec["crop"]["height"], spec["crop"]["width"]
    app = FastAPI()

    def preprocess(data: bytes) -> np.ndarray:
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert(mode)
        w, h = im.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - crop_h) / 2)), int(round((nw - crop_w) / 2))
        im = im.crop((left, top, left + crop_w, top + crop_h))
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]

    @app.post("/v1/embed")
    async def embed_raw(request: Request):
        data = await request.body()
        try:
            x = preprocess(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is the client's
            raise HTTPException(400, f"undecodable image: {e}") from e
        # Inference off the event loop, like a typical deployment.
        emb = (await run_in_threadpool(session.run, ["embedding"], {"images": x}))[0][0]
        return {"model": manifest["name"], "dim": int(emb.shape[0]), "embeddings": [emb.tolist()]}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, type=pathlib.Path)
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    uvicorn.run(build_app(a.model, a.threads), host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
