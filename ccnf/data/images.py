"""Image and mask decoding with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ccnf.errors import CcnfError


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise CcnfError(f"image file not found: {path}", fix="re-run the prepare stage") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CcnfError(
            f"cannot decode image {path}: {err}",
            where=str(path),
            fix="replace or remove the corrupt file, then re-run (dvc repro)",
        ) from None
    return img


def verify_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path`` once (catches truncated files); return (width, height)."""
    return _open(path).size


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an RGB or grayscale image, resize to (size, size) bilinearly.

    Returns float32 (size, size, 3) in [0, 1]; grayscale is replicated to three channels.
    """
    img = _open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_mask(path: Path, size: int, threshold: int = 127) -> np.ndarray:
    """Decode a ground-truth mask, resize with nearest neighbour; returns bool (size, size).

    A pixel is a defect when its grey value is above ``threshold``: 127 for MVTec-layout masks
    (0/255), 0 for VisA's (defect pixels non-zero); the manifest records which.
    """
    img = _open(path).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img) > threshold
