"""Image and mask decoding: one documented rule per image mode, errors that name the file.

Every file is decoded by Pillow, then turned into values in [0, 1] by the rule of its mode
(README, "Images and masks"); nothing is guessed and nothing is saturated:

============================  ===============================================================
mode (what Pillow reports)    rule
============================  ===============================================================
``1``, ``L`` (8-bit grey)     value / 255, replicated to three channels
``RGB``, ``RGBX``, ``YCbCr``  8-bit colour, value / 255 (YCbCr/HSV converted by Pillow)
``HSV``
``P`` (palette)               the palette's colours; with transparency as ``RGBA``
``CMYK``                      R = (255 - C)(255 - K) / 255 (likewise G, B; no ICC profile)
``LA``, ``RGBA`` (+ ``La``,   composited on black: colour x alpha / 255; a fully opaque
``RGBa``, ``PA``)             image is therefore exactly its colour channels
``I;16``, ``I;16B`` ...       16-bit grey, value / 65535 (full range, never clipped to 8 bits)
``I`` (32-bit integer)        read as 16-bit grey: values must lie in [0, 65535]
``F`` (32-bit float)          used as is: values must be finite and lie in [0, 1]
16-bit colour PNG             Pillow decodes it to 8 bits (the high byte): value / 255
============================  ===============================================================

An EXIF orientation tag (2-8) is applied before anything else, to images and masks alike.
Refused with a :class:`CcnfError` that names the file: what Pillow cannot decode (random
bytes, a truncated file), more than :data:`MAX_PIXELS` pixels (decompression-bomb guard, checked
from the header before any pixel is decoded), several frames, a zero-sized image, a mode not
listed above, an ``I`` or ``F`` image outside its range.

8-bit images are resized in 8 bits, exactly as before this table existed (so the study's
features did not change); 16-bit and float images are resized in float32.

Masks: decoded by the same rules to a grey level g in [0, 1] (colour masks: the luminance
0.299 R + 0.587 G + 0.114 B, Pillow's ``L``); a pixel is a defect when g > 1/2 (8-bit: value >
127, MVTec's white = defect). A mask must have its image's size (after EXIF orientation):
a mismatch is an error, never a silent stretch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ccnf.errors import CcnfError

# Pillow's own decompression-bomb threshold: larger images are refused here with a CcnfError
# (Pillow would only warn up to twice this size, then raise its own exception)
MAX_PIXELS = 89_478_485
# the warning precedes our error for the same images; the error is what the user sees
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_FIX = "replace or remove the file (or convert it to an 8- or 16-bit PNG), then re-run: dvc repro"
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = {"LA": "LA", "La": "LA", "RGBA": "RGBA", "RGBa": "RGBA", "PA": "RGBA"}

# decoded pixels: an 8-bit Pillow image in mode L or RGB, or float32 (H, W, C), C in {1, 3}
Pixels = Image.Image | np.ndarray


def _error(path: Path, what: str, verb: str = "use") -> CcnfError:
    return CcnfError(f"cannot {verb} image {path}: {what}", where=str(path), fix=_FIX)


def _open(path: Path) -> Image.Image:
    """Open, check the header (size, frames), decode, apply the EXIF orientation."""
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise CcnfError(f"image file not found: {path}", where=str(path),
                        fix="re-run the prepare stage (dvc repro)") from None
    except Image.DecompressionBombError:
        raise _error(path, f"more than {MAX_PIXELS} pixels (decompression-bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _error(path, f"not a readable image ({err})", "decode") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise _error(path, f"its size is {w}x{h}")
    if w * h > MAX_PIXELS:
        raise _error(path, f"{w}x{h} = {w * h} pixels, more than {MAX_PIXELS} "
                     "(decompression-bomb guard)")
    try:
        frames = getattr(img, "n_frames", 1)  # counting frames may read the whole file
        if frames > 1:
            raise _error(path, f"it has {frames} frames (pages); store one image per file")
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if orientation in range(2, 9):
            img = ImageOps.exif_transpose(img)
    except CcnfError:
        raise
    except Exception as err:  # any decoder failure is bad data, not a bug of ours
        raise _error(path, f"{type(err).__name__}: {err}", "decode") from None
    return img


def _composite(img: Image.Image) -> Pixels:
    """LA/RGBA-like image -> colour x alpha (composited on black); opaque -> its colour."""
    img = img.convert(_ALPHA[img.mode])
    alpha = np.asarray(img.getchannel("A"))
    colour = img.convert("L" if img.mode == "LA" else "RGB")
    if (alpha == 255).all():
        return colour  # exactly what dropping the alpha channel gives
    arr = np.asarray(colour, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return arr * (alpha.astype(np.float32)[..., None] / 255.0)


def _pixels(img: Image.Image, path: Path) -> Pixels:
    """Apply the rule of ``img.mode`` (module docstring)."""
    mode = img.mode
    if mode in ("1", "L"):
        return img.convert("L")
    if mode == "P":
        if "transparency" not in img.info:
            return img.convert("RGB")
        return _composite(img.convert("RGBA"))
    if mode in ("RGB", "RGBX", "YCbCr", "HSV", "CMYK"):
        return img.convert("RGB")
    if mode in _ALPHA:
        return _composite(img)
    if mode in _GREY16:
        return (np.asarray(img).astype(np.float32) / 65535.0)[..., None]
    if mode == "I":
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise _error(path, f"32-bit integer values in [{lo}, {hi}]: only 0..65535 "
                         "(16-bit grey) are accepted")
        return (arr.astype(np.float32) / 65535.0)[..., None]
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise _error(path, "float pixels include NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise _error(path, f"float pixels in [{lo:g}, {hi:g}]: float images must lie in "
                         "[0, 1] (they are never rescaled)")
        return arr[..., None].copy()
    raise _error(path, f"image mode '{mode}' is not supported")


def decode(path: Path) -> tuple[Pixels, tuple[int, int]]:
    """Decode ``path`` by the rules above; returns (pixels, (width, height))."""
    img = _open(Path(path))
    return _pixels(img, Path(path)), img.size


def verify_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path`` once (catches truncated and unusable files); (width, height)."""
    return decode(path)[1]


def _resize_float(arr: np.ndarray, size: int) -> np.ndarray:
    """float32 (H, W, C) -> (size, size, C), bilinear per channel, clipped to [0, 1]."""
    if arr.shape[:2] == (size, size):
        return arr
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c])).resize(
            (size, size), Image.BILINEAR))
        for c in range(arr.shape[-1])
    ]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def to_image(pixels: Pixels, size: int) -> np.ndarray:
    """Decoded pixels -> float32 (size, size, 3) in [0, 1]; grey replicated to 3 channels."""
    if isinstance(pixels, Image.Image):
        img = pixels.convert("RGB")  # as before: grey -> RGB, then resize in 8 bits
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32) / 255.0
    out = _resize_float(pixels, size)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def to_mask(pixels: Pixels, size: int, threshold: int = 127) -> np.ndarray:
    """Decoded mask pixels -> bool (size, size): grey level (0-255) above ``threshold`` =
    defect; 127 (the default, MVTec's 0/255 masks) means above half the range, 0 (VisA) any
    non-zero pixel. Masks of more than 8 bits compare their [0, 1] level with threshold / 255
    (half the range for 127)."""
    if isinstance(pixels, Image.Image):
        grey = pixels.convert("L")
    else:
        g = pixels[..., 0] if pixels.shape[-1] == 1 else pixels @ np.float32([0.299, 0.587,
                                                                               0.114])
        level = 0.5 if threshold == 127 else threshold / 255.0
        grey = Image.fromarray(np.where(g > level, 255, 0).astype(np.uint8))
        threshold = 127
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.NEAREST)
    return np.asarray(grey) > threshold


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image and resize it to (size, size) bilinearly.

    Returns float32 (size, size, 3) in [0, 1] (rules: module docstring).
    """
    return to_image(decode(path)[0], size)


def load_mask(path: Path, size: int, threshold: int = 127) -> np.ndarray:
    """Decode a ground-truth mask, resize with nearest neighbour; returns bool (size, size).

    A pixel is a defect when its grey value is above ``threshold``: 127 for MVTec-layout masks
    (0/255), 0 for VisA's (defect pixels non-zero); the manifest records which.
    """
    return to_mask(decode(path)[0], size, threshold)


def check_mask_size(image: Path, mask: Path, image_size: tuple[int, int],
                    mask_size: tuple[int, int]) -> None:
    """A mask must cover its image pixel for pixel: a size mismatch is an error."""
    if image_size != mask_size:
        raise CcnfError(
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is "
            f"{image_size[0]}x{image_size[1]}: it would be stretched onto misaligned pixels",
            where=str(mask),
            fix="store the mask at its image's size (or fix which mask belongs to which "
            "image), then re-run: dvc repro",
        )


def load_image_and_mask(
    image: Path, mask: Path, size: int, mask_size: int, threshold: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) float32, mask (mask_size, mask_size) bool); sizes must match.
    ``threshold``: see :func:`load_mask`."""
    pixels, isize = decode(image)
    mpixels, msize = decode(mask)
    check_mask_size(image, mask, isize, msize)
    return to_image(pixels, size), to_mask(mpixels, mask_size, threshold)
