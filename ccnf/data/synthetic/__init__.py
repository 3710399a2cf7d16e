"""Embedded synthetic industrial dataset (DESIGN.md section 6), generated in MVTec AD layout.

Nothing can be downloaded at run time, so the default study runs on this dataset. It is built
to be a fair test bed rather than a toy:

* 15 classes, 9 textures and 6 objects, 10 RGB and 5 grayscale (stored as 1-channel PNG, like
  MVTec's grid/screw/zipper);
* every normal image is drawn from a distribution: pose (rotation, shift), illumination (gain,
  colour cast, gradient), colour, scale and texture phase vary per image, and some classes
  have rare-but-normal variation (knots in ``oak``, date codes on ``ic``, margins on
  ``perforated``, speckle density on the pills);
* near-duplicate classes that share material, so that one class's normal is anomalous for the
  other and a class-agnostic model confuses them: weave/twill (same threads, other
  interlacing), granite/terrazzo (same grains, dense vs. set in cement), brushed/perforated
  (same sheet), washer/hexnut (same turned steel, round vs. hex), caplet/tablet (same coating,
  ink and press), plus looser pairs (mesh/perforated, oak/hide, gear/washer on one conveyor);
* eight defect kinds with exact masks, many subtle (low contrast, small): scratch, hole, stain,
  missing_part, cut_paste (from elsewhere in the image or another image of the class),
  noise_patch (a foreign texture), misprint, and mix_up (the near-duplicate's part in place of
  this class's part; the mask is both parts' silhouettes). Some defects are the sibling's
  material: a misweave in weave is twill, a filler patch in granite is terrazzo.

Calibration (``ccnf data check``, :mod:`ccnf.data.calibration`): a training-free 1-NN patch
memory should find the set hard but learnable, and a memory pooled over all classes must do
worse than per-class memories. Local "sibling material" defects hide only partly from a pooled
memory (their boundary stays novel); the mix-ups are what make class conditioning matter at
the image level. Per-class ``contrast``/``scale`` factors in ``_SPECS`` set each class's
difficulty.

Determinism: every image gets its own ``numpy.random.Generator`` seeded from ``(seed,
crc32(class), split, defect kind, index)``, so the output is bit-identical across runs and
independent of generation order, worker count, set size and CPU (:mod:`.portable`). Rendering
is a pure function of the sampled parameters: ``missing_part``, ``misprint`` (and a few class-
specific kinds) re-render the same parameters with one change and take the mask from the
difference of the two clean renders, so those masks are exact by construction. The other kinds
paint onto the clean render with an alpha map; the mask is where that alpha reaches one half.

The package holds one concept per module:

* :mod:`.portable`: exp, sin, cos, arctan2, hypot, power and the Gaussian blur from exactly
  rounded operations only, so the images are the same bits on every CPU (numpy's own
  transcendental ufuncs pick their kernels by CPU);
* :mod:`._common`: the small numeric helpers every renderer and defect uses;
* :mod:`.glyphs`: the dot-matrix font of imprints and laser markings;
* :mod:`.scene`: what a class renderer returns and a class's recipe (``_Spec``);
* :mod:`.textures` and :mod:`.objects`: the samplers, renderers and alterers of the classes;
* :mod:`.classes`: the class list (``CLASS_INFO``, the split) and the renderer registry;
* :mod:`.defects`: the painted defects and the mix-up;
* :mod:`.image`: one image of a class and its defect mask (:func:`synthesize`);
* :mod:`.writer`: the per-image seeds and the dataset on disk in MVTec layout (:func:`generate`);
* :mod:`.sample_grid`: the README's sample grid (:func:`render_sample_grid`).
"""

from ccnf.data.synthetic._common import F32, Params
from ccnf.data.synthetic.classes import (
    CLASS_INFO,
    DEFECT_KINDS,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SPLIT,
    ClassInfo,
)
from ccnf.data.synthetic.image import synthesize
from ccnf.data.synthetic.sample_grid import render_sample_grid
from ccnf.data.synthetic.scene import Alterer, Renderer, Sampler, Scene
from ccnf.data.synthetic.writer import generate

__all__ = [
    "CLASS_INFO",
    "DEFECT_KINDS",
    "F32",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SPLIT",
    "Alterer",
    "ClassInfo",
    "Params",
    "Renderer",
    "Sampler",
    "Scene",
    "generate",
    "render_sample_grid",
    "synthesize",
]
