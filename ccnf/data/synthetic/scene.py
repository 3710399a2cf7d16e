"""What a class renderer returns (:class:`Scene`) and a class's recipe (``_Spec``): how to
sample its parameters, render them, alter them for a defect, and how hard its painted defects
are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ccnf.data.synthetic._common import F32, Params


@dataclass
class Scene:
    """A clean render: ``img`` (S, S, 3); ``fg`` (S, S) in [0, 1], the surface on which defects
    may lie (all ones for textures); ``bg`` what a hole through the part shows (None: a dark
    cavity)."""

    img: F32
    fg: F32
    bg: F32 | None = None


Sampler = Callable[[np.random.Generator, int], Params]
Renderer = Callable[[Params, int], Scene]
Alterer = Callable[[str, Params, np.random.Generator, int], Params]


@dataclass(frozen=True)
class _Spec:
    sample: Sampler
    render: Renderer
    alter: Alterer | None = None
    # defect kinds made by re-rendering altered parameters (mask = difference of renders)
    altered: tuple[str, ...] = ("missing_part", "misprint")
    # multiplies the contrast of painted defects: < 1 makes a class harder
    contrast: float = 1.0
    # multiplies the size of painted defects
    scale: float = 1.0
