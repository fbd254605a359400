"""The one place repae decodes an image file: a pixel limit checked before decoding, every Pillow mode
mapped to RGB uint8 the same way, and one exception type for "skip this file".

Every reader (image folders, `repae prepare-data`, packed shards, evaluation folders, stage-2 caching)
calls `decode_image`; a file it rejects raises `UnreadableImage`, which the reader skips and counts.

Pixel limit (`data.max_image_pixels`, default 64 megapixels): `Image.open` reads only the header, so
width x height is checked before a single pixel is decoded; a 2 KB PNG claiming 30000x30000 is refused
in microseconds instead of allocating gigabytes. ImageNet's largest images are ~10-20 MP and a 50 MP
camera frame is 8688x5792, so 64 MP refuses no real photo while bounding one decoded RGB image at
~192 MB per reader process/thread (RGBA or 16-bit modes at most ~2.7x that, transiently).
Pillow's own guard (DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS, ~179 MP; the
DecompressionBombWarning above ~89 MP when warnings are errors) is caught and treated the same way.
The limit also bounds the resize of the centre crop: scaling the short side of a thin image up to the crop
size multiplies its pixels (an 89-byte 1x4000 PNG resized for a 256px crop is 256x1024000 = 262 MP), so an
image whose resize would exceed the limit is refused from its header too (see crop_resize_size).

Modes -> RGB (test_bad_images.py checks each against known values):
- RGB as is; L, 1, CMYK, YCbCr, RGBX... through Pillow's conversion (1 -> 0/255, CMYK naive inversion);
- 16-bit greyscale (I;16, I;16L, I;16B, I;16N) and I (32-bit integer, which is how Pillow has opened
  16-bit PNG/TIFF greyscale): taken as 16-bit samples and scaled by 255/65535 with rounding
  (65535 -> 255, 32768 -> 128), values outside 0..65535 clipped. Pillow's convert() clips them at 255
  instead, which turns almost every 16-bit image white;
- F (32-bit float): taken as intensities in [0, 1] (the float-image convention), x255, clipped, NaN -> 0;
- anything with transparency (RGBA, LA, La, RGBa, PA, P or L with a transparency entry) is
  composited onto WHITE. Dropping alpha instead exposes whatever colour the encoder left under
  transparent pixels (often black, sometimes garbage); white is what a viewer shows on a page.
  (ADM's reference crop drops alpha; ImageNet holds no more than a handful of such files.)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000
# Pillow refuses anything above 2 x Image.MAX_IMAGE_PIXELS at open time whatever we allow; the config range stops here
PIL_HARD_LIMIT = 2 * 89_478_485

Source = Union[str, os.PathLike, bytes]

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "La", "RGBa", "PA"}


class UnreadableImage(ValueError):
    """This file cannot be used as an image (corrupt, truncated, unsupported or over the pixel limit)."""


class ImageTooLarge(UnreadableImage):
    """The header claims more pixels than the limit: refused before decoding."""


# what Pillow raises on bad files; DecompressionBombWarning is raised when warnings are errors. MemoryError and
# OverflowError: what Pillow raises when a file's sizes pass our checks but not its allocator or C ints (one
# image that cannot be held is a record to skip, like any other; a process truly out of memory fails on the
# next allocation anyway, and 100 skips in a row are an error)
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, OverflowError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)


def _white_composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded Pillow image of any mode -> an RGB image (see the module docstring for each mode)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        x = np.asarray(img).astype(np.int64)  # [H,W]
        grey = ((np.clip(x, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)  # round(x/257)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        x = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        grey = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _white_composite(img)
    return img.convert("RGB")


def crop_resize_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """The (width, height) adm_center_crop resizes a width x height image to before it crops `size` x `size`,
    computed from the sizes alone (the same halving and rounding), so it can be checked before any pixel."""
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
    scale = size / min(width, height)
    return round(width * scale), round(height * scale)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM (guided-diffusion) centre crop: halve with BOX while >= 2x the size, BICUBIC-resize the
    short side to `size`, crop the centre. Returns uint8 [size,size,3]."""
    image = to_rgb(image)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """ImageTooLarge if the (header-declared) size of `img` exceeds `max_pixels`; decodes nothing."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h / 1e6:.1f} megapixels is over the limit of "
                            f"{max_pixels / 1e6:.1f} (data.max_image_pixels)")


def check_resize(img: Image.Image, size: int, max_pixels: int) -> None:
    """ImageTooLarge if centre-cropping `img` to `size` would resize it to more than the limit; decodes nothing.
    The limit is `max_pixels`, but never below 4 crops' worth (4 x size^2): a resize of that size costs no more
    than a few crops, and refusing it would refuse every ordinary photo (aspect ratio up to 4:1) to a user who set
    data.max_image_pixels below the crop's own pixel count."""
    w, h = img.size
    if min(w, h) <= 0:
        raise UnreadableImage(f"the image is {w}x{h}: it has no pixels")
    rw, rh = crop_resize_size(w, h, size)
    limit = max(max_pixels, 4 * size * size)
    if rw * rh > limit:
        raise ImageTooLarge(f"{w}x{h} would be resized to {rw}x{rh} = {rw * rh / 1e6:.1f} megapixels for a {size}px "
                            f"centre crop, over the limit of {limit / 1e6:.1f} (data.max_image_pixels; an image "
                            f"this thin is not a photo to train on)")


def decode_image(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS, size: Optional[int] = None) -> np.ndarray:
    """A file path or encoded bytes -> uint8 [H,W,3] RGB, ADM-centre-cropped to [size,size,3] when `size`
    is given. Raises UnreadableImage (ImageTooLarge over `max_pixels`, or when the crop's resize would be,
    checked from the header before decoding) for anything a reader should skip."""
    opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    try:
        with Image.open(opened) as img:
            check_pixels(img, max_pixels)
            if size:
                check_resize(img, size, max_pixels)
            img.load()
            return adm_center_crop(img, size) if size else np.asarray(to_rgb(img))
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"{type(err).__name__}: {err}") from None
    except PIL_ERRORS as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from None
