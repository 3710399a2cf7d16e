"""A corpus of images and masks generated here: every mode decoded to the right values, every
malformed file rejected with one CcnfError naming it (never a traceback, never a silent change).

The rules are those of ccnf/data/images.py (README, "Images and masks").
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_mvtec_root
from PIL import Image

from ccnf.data.images import (
    MAX_PIXELS,
    decode,
    load_image,
    load_image_and_mask,
    load_mask,
    verify_image,
)
from ccnf.data.manifest import index_root
from ccnf.errors import CcnfError

RNG = np.random.default_rng(0)
GREY16 = np.array([[0, 1, 255, 256, 32767, 32768], [40000, 50000, 60000, 65534, 65535, 12345],
                   *RNG.integers(0, 65536, size=(4, 6))], dtype=np.uint16)  # 6 x 6
RGB8 = RNG.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
ALPHA = np.array([0, 1, 127, 128, 254, 255] * 6, dtype=np.uint8).reshape(6, 6)


# ----------------------------------------------------------------------------- hand-made PNGs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(arr: np.ndarray, bit_depth: int, colour_type: int, *, width: int | None = None,
              height: int | None = None) -> bytes:
    """A PNG written byte by byte (Pillow writes no 16-bit colour PNG); the header may lie
    about the size (``width``/``height``), as a decompression bomb's does."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w if width is None else width, h if height is None else height,
                       bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- decoded right


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def _rgba_composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) / 255) * (alpha.astype(np.float32)[..., None] / 255)


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return (255 - c) * (255 - k) / 255 / 255


PALETTE = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 8, size=(6, 6), dtype=np.uint8)
CMYK = RNG.integers(0, 256, size=(6, 6, 4), dtype=np.uint8)
FLOAT = RNG.random((6, 6), dtype=np.float32)
FLOAT[0, :2] = (0.0, 1.0)


def _palette(transparent: bool) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        img = Image.fromarray(INDEX)
        img = img.convert("P")
        img.putpalette(PALETTE.tobytes())
        kw = {"transparency": 3} if transparent else {}
        return _save(img, d / "p.png", **kw)

    return make


def _expected_palette(transparent: bool) -> np.ndarray:
    rgb = PALETTE[INDEX].astype(np.float32) / np.float32(255)
    if transparent:
        rgb[INDEX == 3] = 0.0
    return rgb


# name -> (write the file into a folder, expected (6, 6, 3) float values, tolerance)
DECODED: dict[str, tuple[Callable[[Path], Path], np.ndarray, float]] = {
    "1 (bilevel)": (lambda d: _save(Image.fromarray(RGB8[..., 0] > 127), d / "b.png"),
                    np.repeat((RGB8[..., :1] > 127).astype(np.float32), 3, -1), 0.0),
    "L (8-bit grey)": (lambda d: _save(Image.fromarray(RGB8[..., 1]), d / "l.png"),
                       np.repeat(RGB8[..., 1:2].astype(np.float32) / 255, 3, -1), 0.0),
    "I;16 PNG (16-bit grey)": (lambda d: _save(Image.fromarray(GREY16), d / "g16.png"),
                               np.repeat(GREY16[..., None] / 65535, 3, -1), 1e-7),
    "I;16B TIFF (big-endian)": (
        lambda d: _save(Image.frombytes("I;16B", (6, 6), GREY16.astype(">u2").tobytes()),
                        d / "g16b.tif"),
        np.repeat(GREY16[..., None] / 65535, 3, -1), 1e-7),
    "I TIFF (32-bit, 0..65535)": (
        lambda d: _save(Image.fromarray(GREY16.astype(np.int32)), d / "i.tif"),
        np.repeat(GREY16[..., None] / 65535, 3, -1), 1e-7),
    "F TIFF (float in [0, 1])": (lambda d: _save(Image.fromarray(FLOAT), d / "f.tif"),
                                 np.repeat(FLOAT[..., None], 3, -1), 0.0),
    "RGB": (lambda d: _save(Image.fromarray(RGB8), d / "rgb.png"),
            RGB8.astype(np.float32) / 255, 0.0),
    "P (palette)": (_palette(False), _expected_palette(False), 0.0),
    "P with transparency": (_palette(True), _expected_palette(True), 0.0),
    "LA (grey + alpha)": (
        lambda d: _save(Image.frombytes("LA", (6, 6), np.dstack([RGB8[..., 2], ALPHA]).tobytes()),
                        d / "la.png"),
        np.repeat(_rgba_composite(RGB8[..., 2:3], ALPHA), 3, -1), 1e-7),
    "RGBA": (lambda d: _save(Image.frombytes("RGBA", (6, 6), np.dstack([RGB8, ALPHA]).tobytes()),
                             d / "rgba.png"),
             _rgba_composite(RGB8, ALPHA), 1e-7),
    "RGBA fully opaque": (
        lambda d: _save(Image.frombytes("RGBA", (6, 6), np.dstack(
            [RGB8, np.full((6, 6), 255, np.uint8)]).tobytes()), d / "opaque.png"),
        RGB8.astype(np.float32) / 255, 0.0),
    "CMYK TIFF": (lambda d: _save(Image.frombytes("CMYK", (6, 6), CMYK.tobytes()), d / "c.tif"),
                  _cmyk_to_rgb(CMYK), 0.5 / 255 + 1e-7),  # Pillow rounds to 8 bits
    "16-bit RGB PNG (read at 8 bits)": (
        lambda d: (d / "rgb16.png").write_bytes(png_bytes(
            np.dstack([GREY16, GREY16[::-1], GREY16[:, ::-1]]), 16, 2)) and d / "rgb16.png",
        np.dstack([GREY16, GREY16[::-1], GREY16[:, ::-1]]) // 256 / 255, 1e-7),
}


@pytest.mark.parametrize("name", list(DECODED))
def test_every_mode_decodes_to_the_documented_values(name: str, tmp_path: Path,
                                                     faults) -> None:
    make, expected, tol = DECODED[name]
    path = make(tmp_path)
    got = load_image(path, 6)  # the native size: no resampling in the way of exact values
    faults.inject("image mode decoded", detail=name)
    assert got.shape == (6, 6, 3) and got.dtype == np.float32
    ok = bool(np.abs(got.astype(np.float64) - expected).max() <= tol)
    assert faults.check(ok, f"decoded values of {name}"), np.abs(got - expected).max()
    assert verify_image(path) == (6, 6)


def test_16_bit_grey_is_not_saturated(tmp_path: Path) -> None:
    """Finding 1: `.convert("RGB")` turned a 16-bit PNG into pure white."""
    path = _save(Image.fromarray(np.full((8, 8), 32768, np.uint16)), tmp_path / "mid.png")
    assert Image.open(path).mode == "I;16"
    got = load_image(path, 8)
    assert np.allclose(got, 32768 / 65535)  # mid grey, not 1.0


@pytest.mark.parametrize("orientation,turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, turn: int,
                                     faults) -> None:
    stored = RGB8[:4]  # 4 x 6: a turn by 90 degrees shows as 6 x 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(stored), tmp_path / "o.png", exif=exif)
    pixels, (w, h) = decode(path)
    shown = np.rot90(stored, turn)
    faults.inject("image mode decoded", detail=f"EXIF {orientation}")
    assert (h, w) == shown.shape[:2]
    assert faults.check(np.array_equal(np.asarray(pixels), shown), f"EXIF {orientation}")


def test_1x1_and_extreme_aspect_ratios_decode(tmp_path: Path, faults) -> None:
    one = _save(Image.fromarray(np.array([[[10, 200, 31]]], np.uint8)), tmp_path / "1x1.png")
    assert np.array_equal(load_image(one, 8), np.broadcast_to(
        np.array([10, 200, 31], np.float32) / 255, (8, 8, 3)))
    ramp = np.linspace(0, 65535, 4096).astype(np.uint16)
    for name, arr in (("wide", ramp[None, :]), ("tall", ramp[:, None])):
        path = _save(Image.fromarray(arr), tmp_path / f"{name}.png")
        got = load_image(path, 16)[..., 0]
        along = got[0] if name == "wide" else got[:, 0]
        across = got if name == "wide" else got.T
        assert np.array_equal(across, np.broadcast_to(along, (16, 16)))  # constant across
        # a linear ramp averaged over each output pixel's footprint: the ramp at its centre
        centres = (np.arange(16) + 0.5) / 16
        assert np.allclose(along[1:-1], centres[1:-1], atol=2e-3), along
        faults.inject("odd image geometry", detail=name)
    faults.inject("odd image geometry", detail="1x1")


# ----------------------------------------------------------------------------- refused

def _multi_frame(d: Path) -> Path:
    first = Image.fromarray(RGB8)
    return _save(first, d / "stack.tif", save_all=True, append_images=[first])


def _truncated(fmt: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        path = _save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                     d / f"t.{fmt.lower()}", format=fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    return make


def _bad_idat_crc(d: Path) -> Path:
    data = bytearray(png_bytes(RGB8, 8, 2))
    data[-30] ^= 0x01  # inside the IDAT chunk
    (d / "crc.png").write_bytes(bytes(data))
    return d / "crc.png"


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


def _dir(d: Path) -> Path:
    (d / "folder.png").mkdir()
    return d / "folder.png"


# name -> (write the file, the message it must give)
REFUSED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "random bytes": (_write("random.png", bytes(RNG.integers(0, 256, 4096, dtype=np.uint8))),
                     "cannot decode image"),
    "empty file": (_write("empty.png", b""), "cannot decode image"),
    "text file": (_write("readme.png", b"<html>not an image</html>\n"), "cannot decode image"),
    "truncated PNG": (_truncated("PNG"), "cannot decode image"),
    "truncated JPEG": (_truncated("JPEG"), "cannot decode image"),
    "PNG with a bad CRC": (_bad_idat_crc, "cannot decode image"),
    "bomb header (10^10 px)": (_write("bomb.png", png_bytes(RGB8, 8, 2, width=100_000,
                                                            height=100_000)),
                               "decompression-bomb guard"),
    "bomb header (just over the limit)": (
        _write("big.png", png_bytes(RGB8, 8, 2, width=10_000, height=MAX_PIXELS // 10_000 + 1)),
        "decompression-bomb guard"),
    "zero width": (_write("zero.png", png_bytes(RGB8, 8, 2, width=0)), "image"),
    "two frames": (_multi_frame, "has 2 frames"),
    "a directory": (_dir, "image"),
    "I out of 16-bit range": (
        lambda d: _save(Image.fromarray(np.array([[-5, 70000]], np.int32)), d / "i.tif"),
        "only 0..65535"),
    "F above 1": (lambda d: _save(Image.fromarray(np.float32([[0.5, 2.0]])), d / "f.tif"),
                  "must lie in"),
    "F with NaN": (lambda d: _save(Image.fromarray(np.float32([[0.5, np.nan]])), d / "n.tif"),
                   "NaN or infinity"),
    "unsupported mode (LAB)": (lambda d: _save(Image.new("LAB", (4, 4)), d / "lab.tif"),
                               "mode 'LAB' is not supported"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", list(REFUSED))
def test_malformed_images_are_refused_with_one_error_naming_the_file(
    name: str, tmp_path: Path, faults
) -> None:
    make, message = REFUSED[name]
    path = make(tmp_path)
    faults.inject("malformed image", detail=name)
    for load in (verify_image, lambda p: load_image(p, 8), lambda p: load_mask(p, 8)):
        with pytest.raises(CcnfError) as info:
            load(path)
        text = info.value.render()
        assert message in text and str(path) in text, text
    faults.check(True, f"{name} refused")


def test_a_malformed_image_stops_prepare_without_a_traceback(tmp_path: Path) -> None:
    root = make_mvtec_root(tmp_path / "ds", ["a"], n_train=2, n_good=1, n_bad=1)
    bad = root / "a" / "train" / "good" / "001.png"
    bad.write_bytes(os.urandom(100))
    params = tmp_path / "params.yaml"
    import yaml
    from conftest import tiny_params

    params.write_text(yaml.safe_dump(tiny_params(root, [["a"]])))
    proc = subprocess.run([sys.executable, "stages/prepare.py", "--params", str(params),
                           "--out", str(tmp_path / "manifest.json")], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    flat = proc.stderr.replace("\n", "")  # rich wraps long paths
    assert "cannot decode image" in flat and str(bad) in flat
    assert not (tmp_path / "manifest.json").exists()


# ----------------------------------------------------------------------------- masks


def test_a_mask_of_another_size_is_an_error_not_a_stretch(tmp_path: Path, faults) -> None:
    """Finding 2: a mask whose size differs from its image was stretched onto it."""
    root = make_mvtec_root(tmp_path / "ds", ["a"], n_train=2, n_good=1, n_bad=1, size=48)
    mask = root / "a" / "ground_truth" / "hole" / "000_mask.png"
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask)
    faults.inject("mask of another size")
    with pytest.raises(CcnfError) as info:
        index_root(root, ["a"], progress=False)
    text = info.value.render()
    assert "48x40" in text and "48x48" in text and str(mask) in text
    with pytest.raises(CcnfError, match="stretched"):
        load_image_and_mask(root / "a" / "test" / "hole" / "000.png", mask, 32, 16)


def test_mask_rule_half_of_the_full_range_is_defect(tmp_path: Path) -> None:
    eight = _save(Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)), tmp_path / "m8.png")
    sixteen = _save(Image.fromarray(np.array([[0, 32767, 32768, 65535]], np.uint16)),
                    tmp_path / "m16.png")
    colour = _save(Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0],
                                              [0, 255, 0]]], np.uint8)), tmp_path / "mc.png")
    for path, want in ((eight, [0, 0, 1, 1]), (sixteen, [0, 0, 1, 1]),
                       (colour, [0, 1, 0, 1])):  # luminance: red 76 (< 128), green 150
        got = load_image_and_mask(path, path, 4, 4)[1]
        assert got.tolist() == [[bool(v) for v in want]] * 4, path.name


def test_an_oriented_image_needs_its_oriented_mask(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = _save(Image.fromarray(RGB8[:4]), tmp_path / "i.png", exif=exif)  # shown 4 wide
    mask = _save(Image.fromarray(np.zeros((6, 4), np.uint8)), tmp_path / "m.png")  # 4 x 6
    img, m = load_image_and_mask(image, mask, 6, 6)
    assert img.shape == (6, 6, 3) and not m.any()
