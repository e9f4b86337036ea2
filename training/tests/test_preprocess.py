import numpy as np
from PIL import Image

from swav_train import preprocess
from swav_train.preprocess import InputSpec


def test_sixteen_bit_becomes_round_v_over_257(tmp_path):
    values = np.array([[0, 128, 129, 257, 385, 386, 65535, 30000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    img = preprocess.to_channels(preprocess.decode(tmp_path / "g16.png"), 1)
    assert img.mode == "L"
    assert np.asarray(img).tolist() == [[0, 0, 1, 1, 1, 2, 255, 117]]


def test_alpha_composites_over_white_with_the_exact_rule():
    c = np.array([0, 10, 200, 255, 100], dtype=np.int64)
    a = np.array([0, 128, 255, 0, 77], dtype=np.int64)
    rgba = np.zeros((1, 5, 4), dtype=np.uint8)
    rgba[0, :, 0] = rgba[0, :, 1] = rgba[0, :, 2] = c
    rgba[0, :, 3] = a
    out = np.asarray(preprocess.to_channels(Image.fromarray(rgba, mode="RGBA"), 3))
    want = [round(ci * ai / 255 + 255 * (255 - ai) / 255) for ci, ai in zip(c, a)]
    assert out[0, :, 0].tolist() == want


def test_palette_transparency_is_composited(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(preprocess.to_channels(preprocess.decode(tmp_path / "p.png"), 3))
    assert out[0].tolist() == [[255, 255, 255], [255, 0, 0]]


def test_luma_uses_the_integer_rule():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 50, 3), dtype=np.int64)
    out = np.asarray(preprocess.to_channels(Image.fromarray(rgb.astype(np.uint8)), 1)).astype(np.int64)
    want = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    assert np.array_equal(out, want)


def test_gray_is_replicated_for_three_channels():
    arr = preprocess.to_array(Image.fromarray(np.full((4, 4), 51, np.uint8)), InputSpec(3, 4, 4, 4))
    assert arr.shape == (3, 4, 4) and np.allclose(arr, 51 / 255)


def test_resize_and_crop_geometry():
    img = Image.fromarray(np.zeros((37, 50, 3), np.uint8))  # 50 wide, 37 high
    resized = preprocess.resize_shorter_side(img, 28)
    assert resized.size == (int(28 * 50 / 37), 28) == (37, 28)
    # (37 - 28) / 2 = 4.5 -> 4 (half to even); (28 - 28) / 2 = 0
    marked = np.zeros((28, 37), np.uint8)
    marked[:, 4] = 255
    crop = preprocess.center_crop(Image.fromarray(marked), 28, 28)
    assert np.asarray(crop)[:, 0].min() == 255
    same = Image.fromarray(np.zeros((28, 28), np.uint8))
    assert preprocess.resize_shorter_side(same, 28) is same


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    img = preprocess.decode(tmp_path / "o.jpg")
    assert img.size == (30, 40)  # rotated
    top = np.asarray(img.convert("L"))[:5].mean()
    bottom = np.asarray(img.convert("L"))[-5:].mean()
    assert top > 200 and bottom < 50  # orientation 6: the stored left edge ends up on top


def test_to_array_layout_and_range():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    arr = preprocess.to_array(Image.fromarray(rgb), InputSpec(3, 2, 2, 2))
    assert arr.dtype == np.float32 and arr.shape == (3, 2, 2)
    assert np.allclose(arr[:, 0, 0], rgb[0, 0] / 255.0)
