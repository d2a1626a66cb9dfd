"""Image preprocessing (runtime/images.py) against transformers' Gemma 3 image processor (Pillow
backend): the same float32 pixel values (compared exactly; the issue allows 1e-6) for every
input kind, mode, size and aspect ratio, and the same pan-and-scan crops."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from blobstore.runtime import images

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SIZE = 28


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers")
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    return Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _picture(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":   # a palette image with a transparent colour
        picture = rgba.convert("RGB").quantize(16)
        picture.info["transparency"] = 3
        return picture
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16"])
@pytest.mark.parametrize("width, height", [(28, 28), (64, 20), (13, 61), (300, 299), (5, 3)])
def test_pixel_values_equal_transformers(reference, mode, width, height):
    picture = _picture(mode, width, height)
    expected = reference(picture, return_tensors="np")["pixel_values"]
    ours = images.preprocess(picture, SIZE)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_array_equal(ours, expected)


def test_every_input_kind_gives_the_same_values(reference, tmp_path):
    picture = _picture("RGB", 45, 31, seed=4)
    path = tmp_path / "picture.png"
    picture.save(path)
    expected = reference(picture, return_tensors="np")["pixel_values"]
    for given in (picture, path, str(path), path.read_bytes(), np.asarray(picture)):
        np.testing.assert_array_equal(images.preprocess(given, SIZE), expected)


@pytest.mark.parametrize("width, height", [(900, 300), (300, 900), (1000, 260), (520, 400), (400, 400), (2000, 100)])
@pytest.mark.parametrize("min_crop, max_crops", [(256, 4), (64, 3)])
def test_pan_and_scan_crops_equal_transformers(reference, width, height, min_crop, max_crops):
    picture = _picture("RGB", width, height, seed=1)
    settings = images.PanAndScan(min_crop_size=min_crop, max_num_crops=max_crops, min_ratio_to_activate=1.2)
    expected = reference(picture, return_tensors="np", do_pan_and_scan=True, pan_and_scan_min_crop_size=min_crop,
                         pan_and_scan_max_num_crops=max_crops, pan_and_scan_min_ratio_to_activate=1.2)
    ours = images.preprocess(picture, SIZE, settings)
    assert len(ours) - 1 == expected["num_crops"][0]
    np.testing.assert_array_equal(ours, expected["pixel_values"])


def test_pan_and_scan_is_off_by_default():
    assert images.preprocess(_picture("RGB", 900, 300), SIZE).shape[0] == 1


def test_unreadable_and_missing_files(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        images.load_rgb(broken)
    with pytest.raises(ValueError, match=r"the image bytes \(3 bytes\): not a readable image"):
        images.load_rgb(b"abc")
    with pytest.raises(FileNotFoundError, match="absent.png: no such image file"):
        images.load_rgb(tmp_path / "absent.png")


def test_empty_images_and_bad_arrays():
    with pytest.raises(ValueError, match=r"the image is empty \(0x5 pixels\)"):
        images.load_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"the image is empty \(4x0 pixels\)"):
        images.load_rgb(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(height, width, 3\) uint8 RGB, found float32 \(4, 4, 3\)"):
        images.load_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"found uint8 \(4, 4\)"):
        images.load_rgb(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="got int"):
        images.load_rgb(7)


def test_without_pillow_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'blobstore-runtime\[vision\]'"):
        images.load_rgb(io.BytesIO(b"").getvalue())
