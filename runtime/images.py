"""Images into pixel values, exactly as transformers' Gemma 3 image processor (its Pillow
backend, `Gemma3ImageProcessorPil`) prepares them by default: RGB (transparency composited onto
white), a bilinear resize to the vision tower's square `image_size` with Pillow, ×1/255 (in
float64, then float32), (x - 0.5) / 0.5, channels first. Pan-and-scan (crops of long images,
each its own image after the original) is an option, off by default as in transformers.

Pillow is an optional dependency: `pip install 'blobstore-runtime[vision]'`.
"""
from __future__ import annotations

import io
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np

IMAGE_MEAN = IMAGE_STD = 0.5   # Gemma 3's preprocessor_config.json (transformers' IMAGENET_STANDARD_*)


@dataclass(frozen=True)
class PanAndScan:
    """transformers' pan-and-scan settings (Gemma3Processor's defaults)."""

    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2


def pillow():
    """The PIL.Image module, or an ImportError that says how to get it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image input needs Pillow: pip install 'blobstore-runtime[vision]' "
                          "(or pip install pillow)") from None
    return Image


def load_rgb(image) -> np.ndarray:
    """An image as an (H, W, 3) uint8 RGB array, from a path, bytes, a PIL image or an
    (H, W, 3) uint8 array. Modes with transparency (RGBA, LA, palette with a transparent
    colour) are composited onto white, other modes (L, P, CMYK, ...) converted, as transformers'
    convert_to_rgb does.

    >>> load_rgb(np.zeros((2, 3, 3), np.uint8)).shape
    (2, 3, 3)
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (height, width, 3) uint8 RGB, found {image.dtype} {image.shape}")
        return _non_empty(image, "the image array")
    Image = pillow()
    if isinstance(image, (bytes, bytearray, memoryview)):
        picture, what = _open(Image, io.BytesIO(bytes(image)), f"the image bytes ({len(image)} bytes)")
    elif isinstance(image, (str, os.PathLike)):
        picture, what = _open(Image, image, os.fspath(image))
    elif isinstance(image, Image.Image):
        picture, what = image, f"the {image.mode} image"
    else:
        raise TypeError(f"an image must be a path, bytes, a PIL image or an (H, W, 3) uint8 array, "
                        f"got {type(image).__name__}")
    return _non_empty(np.asarray(_rgb(Image, picture)), what)


def _open(Image, source, what: str):
    try:
        picture = Image.open(source)
        picture.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such image file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{what}: not a readable image ({error})") from None
    return picture, what


def _rgb(Image, picture):
    if "A" in picture.getbands() or picture.info.get("transparency") is not None:
        white = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, picture.convert("RGBA")).convert("RGB")
    return picture.convert("RGB")


def _non_empty(rgb: np.ndarray, what: str) -> np.ndarray:
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
    return rgb


def pan_and_scan_crops(rgb: np.ndarray, settings: PanAndScan = PanAndScan()) -> list[np.ndarray]:
    """The crops transformers' pan-and-scan cuts from an (H, W, 3) image: none for an image
    closer to square than `min_ratio_to_activate`, else 2..max_num_crops equal strips along the
    long side (the last one cut short at the edge), none when a strip would be narrower than
    `min_crop_size`.

    >>> [c.shape for c in pan_and_scan_crops(np.zeros((300, 900, 3), np.uint8))]
    [(300, 300, 3), (300, 300, 3), (300, 300, 3)]
    """
    height, width = rgb.shape[:2]
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < settings.min_ratio_to_activate:
        return []
    count = min(int(math.floor(long_side / short_side + 0.5)), int(math.floor(long_side / settings.min_crop_size)))
    count = min(settings.max_num_crops, max(2, count))
    across, down = (count, 1) if width >= height else (1, count)
    crop_w, crop_h = int(math.ceil(width / across)), int(math.ceil(height / down))
    if min(crop_w, crop_h) < settings.min_crop_size:
        return []
    return [rgb[top:top + crop_h, left:left + crop_w]
            for top, left in itertools.product(range(0, crop_h * down, crop_h), range(0, crop_w * across, crop_w))]


def pixel_values(rgb: np.ndarray, size: int) -> np.ndarray:
    """float32 (3, size, size): one (H, W, 3) uint8 image resized (bilinear, Pillow), rescaled and
    normalized as transformers does.

    >>> pixel_values(np.full((5, 7, 3), 255, np.uint8), 4)[:, 0, 0]
    array([1., 1., 1.], dtype=float32)
    """
    Image = pillow()
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BILINEAR))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))


def preprocess(image, size: int, pan_and_scan: PanAndScan | None = None) -> np.ndarray:
    """float32 (1 + crops, 3, size, size): the image, then its pan-and-scan crops when
    `pan_and_scan` is given (transformers' order), each as `pixel_values` makes it.

    >>> preprocess(np.zeros((10, 40, 3), np.uint8), 8, PanAndScan(min_crop_size=4)).shape
    (5, 3, 8, 8)
    """
    rgb = load_rgb(image)
    crops = pan_and_scan_crops(rgb, pan_and_scan) if pan_and_scan is not None else []
    return np.stack([pixel_values(part, size) for part in [rgb] + crops])
