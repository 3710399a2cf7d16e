"""The 5x7 dot-matrix font of pill imprints and IC markings, and printing text with it."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ccnf.data.synthetic._common import F32, _rotated, _smoothstep

# 5x7 dot-matrix glyphs for imprints and laser markings (hand-drawn, rows top to bottom).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    " ": (".....",) * 7,
}
# a misprint may swap a character for a look-alike
_LOOKALIKE = {
    "C": "G",
    "F": "E",
    "N": "H",
    "0": "8",
    "1": "7",
    "2": "3",
    "3": "8",
    "4": "1",
    "5": "6",
    "6": "5",
    "7": "1",
    "8": "0",
    "9": "8",
    " ": " ",
    "E": "F",
    "G": "C",
    "H": "N",
}


def _text_bitmap(text: str) -> F32:
    cols: list[NDArray[np.float32]] = []
    for i, ch in enumerate(text):
        glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[ch]], dtype=np.float32)
        if i:
            cols.append(np.zeros((7, 1), dtype=np.float32))
        cols.append(glyph)
    # one empty cell around the text so interpolation fades to zero at the border
    return np.pad(np.concatenate(cols, axis=1), 1).astype(np.float32)


def _text(size: int, text: str, cx: float, cy: float, height: float, angle: float) -> F32:
    """Coverage (S, S) of ``text`` printed with glyph height ``height`` px, rotated."""
    bitmap = _text_bitmap(text)
    cell = height / 7.0
    a, b = _rotated(size, angle, cx, cy)
    u = a / cell + bitmap.shape[1] / 2.0 - 0.5
    v = b / cell + bitmap.shape[0] / 2.0 - 0.5
    val = ndimage.map_coordinates(bitmap, [v.ravel(), u.ravel()], order=1, mode="constant")
    return _smoothstep(0.3, 0.7, val.reshape(size, size).astype(np.float32))
