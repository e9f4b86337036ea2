"""The bundle's preprocessing rule (docs/bundle.md), the one implementation in the trainer.

Training data decoding, evaluation, export parity checks and golden fixtures
all go through here, so what the server must reproduce is exactly this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def decode(source: str | Path | Image.Image) -> Image.Image:
    """Steps 1-2: open, first frame only, EXIF orientation applied. Raises OSError
    (with PIL's reason) for files that cannot be decoded."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    return ImageOps.exif_transpose(img) or img


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    # v / 257 never lands on .5 for integers, so rounding mode does not matter.
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")


def _composite_white(img: Image.Image) -> Image.Image:
    """Step 4 on 8-bit values: out = round(c*a/255 + 255*(255-a)/255)."""
    arr = np.asarray(img, dtype=np.int64)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    # The exact quotient never ends in .5 (255 is odd), so floor(x/255 + 1/2) is the rounding.
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    mode = "L" if out.shape[-1] == 1 else "RGB"
    return Image.fromarray(out.astype(np.uint8).squeeze(-1) if mode == "L" else out.astype(np.uint8), mode=mode)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Steps 3-5: 16-bit to 8-bit, alpha over white, then 'L' (channels=1) or 'RGB' (channels=3)."""
    if img.mode in _SIXTEEN_BIT:
        img = _sixteen_to_eight(img)
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA",):
        img = img.convert("RGBA")
    elif img.mode == "LA" or img.mode == "La":
        img = img.convert("LA")
    elif img.mode in ("RGBa",):
        img = img.convert("RGBA")
    elif img.mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    elif img.mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        img = _composite_white(img)
    if img.mode == "1":
        img = img.convert("L")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, F, ...
    if channels == 1 and img.mode != "L":
        img = img.convert("L")  # ITU-R 601-2 luma, PIL's integer rule
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")  # replicate gray into R, G, B
    return img


@dataclass(frozen=True)
class InputSpec:
    """The manifest's `input` rule: channels, shorter-side resize, centre crop."""

    channels: int
    resize_size: int
    height: int
    width: int

    @classmethod
    def from_manifest(cls, inp: object) -> InputSpec:
        """The rule of a manifest's `input` object; ValueError saying what is wrong when it is not one
        this code knows (docs/bundle.md: shorter-side resize, centre crop, sides up to 4096)."""
        if not isinstance(inp, dict):
            raise ValueError(f"`input` must be an object, not {type(inp).__name__}")
        resize, crop = inp.get("resize"), inp.get("crop")
        if not isinstance(resize, dict) or resize.get("method") != "shorter_side":
            raise ValueError(f"`input.resize` must be {{\"method\": \"shorter_side\", ...}}, not {resize!r}")
        if not isinstance(crop, dict) or crop.get("method") != "center":
            raise ValueError(f"`input.crop` must be {{\"method\": \"center\", ...}}, not {crop!r}")
        values = {"input.channels": inp.get("channels"), "input.resize.size": resize.get("size"),
                  "input.height": inp.get("height"), "input.width": inp.get("width")}
        sides: list[int] = []
        for name, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 4096:
                raise ValueError(f"`{name}` must be an integer in 1..4096, not {v!r}")
            sides.append(v)
        channels, size, height, width = sides
        if channels not in (1, 3):
            raise ValueError(f"`input.channels` must be 1 or 3, not {channels}")
        if size < min(height, width):
            raise ValueError(f"`input.resize.size` {size} is smaller than the {width}x{height} crop")
        return cls(channels, size, height, width)

    def manifest(self, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
        return {
            "name": "images", "layout": "NCHW", "dtype": "float32", "value_range": [0.0, 1.0],
            "channels": self.channels, "height": self.height, "width": self.width,
            "resize": {"method": "shorter_side", "size": self.resize_size, "interpolation": "bilinear",
                       "antialias": True},
            "crop": {"method": "center", "height": self.height, "width": self.width},
            "alpha": "composite_white",
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        }


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Step 6; returns the image itself when the size is unchanged."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Step 7: top = round((h - height) / 2), left likewise (Python's half-to-even round)."""
    w, h = img.size
    if h < height or w < width:
        raise ValueError(f"image of {w}x{h} is smaller than the {width}x{height} crop")
    top, left = round((h - height) / 2), round((w - width) / 2)
    if (top, left, w, h) == (0, 0, width, height):
        return img
    return img.crop((left, top, left + width, top + height))


def needs_resize(img: Image.Image, spec: InputSpec) -> bool:
    return resize_shorter_side(img, spec.resize_size) is not img


def to_array(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Steps 3-8 on a decoded image: float32 C x H x W in [0, 1]."""
    img = to_channels(img, spec.channels)
    img = center_crop(resize_shorter_side(img, spec.resize_size), spec.height, spec.width)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def load_array(path: str | Path, spec: InputSpec) -> np.ndarray:
    """The whole rule, file to tensor."""
    return to_array(decode(path), spec)
