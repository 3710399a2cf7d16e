"""The class list: what each synthetic class is (``CLASS_INFO``), the defect kinds, the
designed 5x3 split, and the registry of each class's renderer recipe (``_SPECS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ccnf.data.synthetic.objects import (
    _alter_gear,
    _alter_hexnut,
    _alter_ic,
    _alter_print,
    _alter_washer,
    _render_caplet,
    _render_gear,
    _render_hexnut,
    _render_ic,
    _render_tablet,
    _render_washer,
    _sample_caplet,
    _sample_gear,
    _sample_hexnut,
    _sample_ic,
    _sample_tablet,
    _sample_washer,
)
from ccnf.data.synthetic.scene import _Spec
from ccnf.data.synthetic.textures import (
    _alter_brushed,
    _alter_inlay,
    _alter_mesh,
    _alter_perforated,
    _alter_weave,
    _render_brushed,
    _render_hide,
    _render_mesh,
    _render_oak,
    _render_perforated,
    _render_stone,
    _render_weave,
    _sample_brushed,
    _sample_hide,
    _sample_mesh,
    _sample_oak,
    _sample_perforated,
    _sample_stone,
    _sample_weave,
)

DEFECT_KINDS: tuple[str, ...] = (
    "scratch",
    "hole",
    "stain",
    "missing_part",
    "cut_paste",
    "noise_patch",
    "misprint",
    "mix_up",
)


@dataclass(frozen=True)
class ClassInfo:
    """What a synthetic class is: used by the README, the sample grid and the tests."""

    kind: Literal["texture", "object"]
    colour: Literal["rgb", "gray"]
    near_duplicates: tuple[str, ...]
    defects: tuple[str, ...]
    description: str

    @property
    def mix_up_with(self) -> str | None:
        """The class whose part turns up in a ``mix_up`` defect: the first near-duplicate."""
        return self.near_duplicates[0] if "mix_up" in self.defects else None


CLASS_INFO: dict[str, ClassInfo] = {
    "weave": ClassInfo(
        "texture",
        "rgb",
        ("twill",),
        ("hole", "stain", "misprint", "scratch"),
        "plain-woven navy fabric; misprint = a block woven as twill",
    ),
    "twill": ClassInfo(
        "texture",
        "rgb",
        ("weave",),
        ("misprint", "stain", "noise_patch", "cut_paste"),
        "2/2 twill of weave's threads (diagonal ribs); misprint = a block woven plain",
    ),
    "mesh": ClassInfo(
        "texture",
        "gray",
        ("perforated",),
        ("missing_part", "stain", "scratch", "noise_patch"),
        "woven wire grid over a dark slot",
    ),
    "perforated": ClassInfo(
        "texture",
        "gray",
        ("mesh", "brushed"),
        ("hole", "scratch", "stain", "missing_part"),
        "brushed's sheet with a hexagonal lattice of punched holes; missing_part = unpunched",
    ),
    "granite": ClassInfo(
        "texture",
        "rgb",
        ("terrazzo",),
        ("scratch", "stain", "noise_patch", "hole"),
        "dense mosaic of pink, grey, white and black grains; noise_patch = cement filler",
    ),
    "terrazzo": ClassInfo(
        "texture",
        "rgb",
        ("granite",),
        ("hole", "stain", "scratch", "noise_patch"),
        "cement matrix with sparse chips of granite's palette; noise_patch = granite grains",
    ),
    "brushed": ClassInfo(
        "texture",
        "gray",
        ("perforated", "washer"),
        ("scratch", "hole", "stain", "noise_patch"),
        "brushed metal streaks; hole = a stray punch like perforated's holes",
    ),
    "oak": ClassInfo(
        "texture",
        "rgb",
        ("hide",),
        ("scratch", "hole", "stain", "cut_paste"),
        "wood board with growth rings and grain; some boards have a knot (normal)",
    ),
    "hide": ClassInfo(
        "texture",
        "rgb",
        ("oak",),
        ("scratch", "hole", "stain", "noise_patch"),
        "pebbled brown leather with a crease network",
    ),
    "washer": ClassInfo(
        "object",
        "gray",
        ("hexnut", "gear"),
        ("scratch", "missing_part", "stain", "mix_up"),
        "turned steel washer with a key tab, any rotation; missing_part = a flat or a bite; "
        "mix_up = a hexnut",
    ),
    "hexnut": ClassInfo(
        "object",
        "gray",
        ("washer",),
        ("scratch", "missing_part", "stain", "mix_up"),
        "hex nut of the washer's steel, threaded bore; missing_part = a corner worn round or "
        "broken; mix_up = a washer",
    ),
    "caplet": ClassInfo(
        "object",
        "rgb",
        ("tablet",),
        ("misprint", "stain", "missing_part", "mix_up"),
        "cream capsule-shaped pill with red speckles and a 'CF' imprint; mix_up = a tablet",
    ),
    "tablet": ClassInfo(
        "object",
        "rgb",
        ("caplet",),
        ("misprint", "stain", "missing_part", "mix_up"),
        "round tablet of the caplet's coating with a score line and an 'NF' imprint, any "
        "rotation; mix_up = a caplet",
    ),
    "ic": ClassInfo(
        "object",
        "rgb",
        (),
        ("misprint", "missing_part", "scratch", "cut_paste"),
        "14-pin IC on a green board; the second marking line is a varying date code",
    ),
    "gear": ClassInfo(
        "object",
        "rgb",
        ("washer",),
        ("missing_part", "hole", "stain", "mix_up"),
        "ivory nylon spur gear with five lightening holes, any rotation; mix_up = a washer",
    ),
}

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(CLASS_INFO)

# 5 tasks x 3 classes. Every near-duplicate pair is split across two tasks, so a continual
# model must keep telling them apart after the second one arrives.
SYNTHETIC_SPLIT: list[list[str]] = [
    ["weave", "mesh", "washer"],
    ["granite", "caplet", "brushed"],
    ["twill", "oak", "ic"],
    ["perforated", "tablet", "hide"],
    ["terrazzo", "hexnut", "gear"],
]


_SPECS: dict[str, _Spec] = {
    "weave": _Spec(_sample_weave, _render_weave, _alter_weave, ("misprint",), 1.2, 1.2),
    "twill": _Spec(
        lambda r, s: _sample_weave(r, s, twill=True),
        _render_weave,
        _alter_weave,
        ("misprint",),
        1.3,
        1.3,
    ),
    "mesh": _Spec(_sample_mesh, _render_mesh, _alter_mesh, contrast=1.4, scale=1.5),
    "perforated": _Spec(
        _sample_perforated, _render_perforated, _alter_perforated, contrast=1.2, scale=1.2
    ),
    "granite": _Spec(_sample_stone, _render_stone, _alter_inlay, ("noise_patch",), 1.8, 1.7),
    "terrazzo": _Spec(
        lambda r, s: _sample_stone(r, s, terrazzo=True),
        _render_stone,
        _alter_inlay,
        ("noise_patch",),
        1.8,
        1.7,
    ),
    "brushed": _Spec(_sample_brushed, _render_brushed, _alter_brushed, ("hole",), 0.7, 1.0),
    "oak": _Spec(_sample_oak, _render_oak, contrast=1.5, scale=1.4),
    "hide": _Spec(_sample_hide, _render_hide, contrast=1.3, scale=1.3),
    "washer": _Spec(_sample_washer, _render_washer, _alter_washer),
    "hexnut": _Spec(_sample_hexnut, _render_hexnut, _alter_hexnut),
    "caplet": _Spec(_sample_caplet, _render_caplet, _alter_print),
    "tablet": _Spec(_sample_tablet, _render_tablet, _alter_print),
    "ic": _Spec(_sample_ic, _render_ic, _alter_ic),
    "gear": _Spec(_sample_gear, _render_gear, _alter_gear),
}
