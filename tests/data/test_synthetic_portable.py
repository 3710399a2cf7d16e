"""ccnf.data.synthetic.portable: the embedded dataset has the same bits on every CPU.

Three checks, from the cheapest to the one that closes the loop: the portable functions agree
with numpy and scipy to float64 rounding; the generator calls no numpy ufunc whose kernel
numpy picks by CPU (even through scipy) and no fractional ``**``; and the images hash alike
with numpy's vector kernels on and off, and to the committed hashes (an AVX2 and an AVX-512
machine must both give these: the study's committed figures come from these bytes).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ccnf.data import synthetic
from ccnf.data.synthetic import CLASS_INFO, SYNTHETIC_CLASSES
from ccnf.data.synthetic import portable as pm

SYNTHETIC_DIR = Path(synthetic.__file__).parent

# numpy's ufuncs with CPU-dispatched kernels (SVML on AVX-512, numpy's own FMA code on AVX2)
DISPATCHED = (
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "power", "float_power", "sin",
    "cos", "tan", "arcsin", "arccos", "arctan", "arctan2", "sinh", "cosh", "tanh", "arcsinh",
    "arccosh", "arctanh", "cbrt", "hypot", "angle", "logaddexp", "logaddexp2",
)  # fmt: skip


def test_portable_functions_match_numpy_to_rounding() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-700, 700, 200_000)
    assert np.max(np.abs(pm.exp(x) / np.exp(x) - 1)) < 1e-15
    assert float(pm.exp(np.array([-1e6]))[0]) == 0.0
    t = rng.uniform(-3000, 3000, 200_000)
    assert np.max(np.abs(pm.sin(t) - np.sin(t))) < 1e-15
    assert np.max(np.abs(pm.cos(t) - np.cos(t))) < 1e-15
    assert np.max(np.abs(pm.wrap_angle(t) - np.angle(np.exp(1j * t)))) < 1e-12
    y, z = rng.normal(size=(2, 200_000))
    assert np.max(np.abs(pm.arctan2(y, z) - np.arctan2(y, z))) < 1e-15
    axes = np.array([0.0, 1.0, -1.0])
    assert np.allclose(pm.arctan2(np.array([0.0, 0.0, 2.0, -2.0, 0.0]),
                                  np.array([0.0, 3.0, 0.0, 0.0, -3.0])),
                       [0.0, 0.0, np.pi / 2, -np.pi / 2, np.pi], atol=1e-15)  # fmt: skip
    assert np.array_equal(pm.hypot(axes * 3, axes * 4), np.abs(axes) * 5)
    u = rng.uniform(0, 1, 200_000)
    assert np.max(np.abs(pm.power(u, 0.6) - u**0.6)) < 1e-15
    assert list(pm.power(np.array([0.0, -1e-9, 1.0]), 0.6)) == [0.0, 0.0, 1.0]
    f32 = rng.uniform(-5, 5, 1000).astype(np.float32)
    assert pm.sin(f32).dtype == np.float32 and pm.exp(f32).dtype == np.float32
    assert pm.hypot(f32, x[:1000]).dtype == np.float64


def test_portable_functions_refuse_what_they_cannot_do_exactly() -> None:
    with pytest.raises(ValueError, match=r"524288"):
        pm.sin(np.array([1e7]))
    with pytest.raises(ValueError, match="p > 0"):
        pm.power(np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="sigmas"):
        pm.gaussian_filter(np.zeros((4, 4)), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("sigma", [0.7, 2.3, (1.5, 3.0, 0)])
@pytest.mark.parametrize("mode", ["reflect", "wrap"])
def test_portable_gaussian_filter_is_scipys(sigma: float | tuple[float, ...], mode: str) -> None:
    a = np.random.default_rng(1).normal(size=(40, 48, 3)).astype(np.float32)
    ours, theirs = pm.gaussian_filter(a, sigma, mode=mode), ndimage.gaussian_filter(a, sigma,
                                                                                    mode=mode)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.max(np.abs(ours - theirs)) < 1e-6
    line = a[:, 0, 0]
    ours_1d = pm.gaussian_filter1d(line, 2.0)
    assert np.max(np.abs(ours_1d - ndimage.gaussian_filter1d(line, 2.0))) < 1e-6


def test_the_generator_calls_no_cpu_dispatched_ufunc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every class and defect kind renders with numpy's dispatched ufuncs replaced by a trap;
    scipy looks them up on the same module, so its internals are covered too."""

    def trap(name: str):  # type: ignore[no-untyped-def]
        def raiser(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"numpy.{name} called: its kernel depends on the CPU")

        return raiser

    for name in DISPATCHED:
        monkeypatch.setattr(np, name, trap(name))
    for cls in SYNTHETIC_CLASSES:
        for defect in (None, *CLASS_INFO[cls].defects):
            synthetic.synthesize(cls, 64, np.random.default_rng(3), defect)


def test_the_generator_has_no_fractional_power_operator() -> None:
    """``a ** 0.6`` on an array calls numpy's power directly (no attribute for the trap above
    to catch); only integer exponents, which numpy computes by exact multiplication."""
    found = []
    for path in sorted(SYNTHETIC_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                right = node.right
                if not (isinstance(right, ast.Constant) and type(right.value) is int):
                    found.append(f"{path.name}:{node.lineno}")
    assert not found, f"fractional or computed ** in the generator (use portable.power): {found}"


HASH_PROBE = """
import hashlib, json, sys
import numpy as np
from ccnf.data.synthetic import CLASS_INFO, SYNTHETIC_CLASSES, synthesize
out = {}
for cls in SYNTHETIC_CLASSES:
    h = hashlib.md5()
    for i, defect in enumerate((None, *CLASS_INFO[cls].defects)):
        img, mask = synthesize(cls, 96, np.random.default_rng([7, i]), defect)
        h.update(img.tobytes() + (b"" if mask is None else mask.tobytes()))
    out[cls] = h.hexdigest()[:16]
json.dump(out, sys.stdout)
"""

# HASH_PROBE's output; the same on an AVX2 and an AVX-512 machine, or the committed study
# does not reproduce there (regenerate with HASH_PROBE only for a deliberate generator change,
# and re-run the study and the catalog with it)
COMMITTED_HASHES = {
    "weave": "e601d85967cbc5f6",
    "twill": "2fc3eab94979f08f",
    "mesh": "ce466ba70b198ffe",
    "perforated": "2377725274d7e234",
    "granite": "d1b758606246e6ae",
    "terrazzo": "585ea5a7190ae7d9",
    "brushed": "f32b47c4a5bad309",
    "oak": "bed1e13c35674a1d",
    "hide": "3b563e4b2921450b",
    "washer": "434b776bca8cbe15",
    "hexnut": "6475c395774848aa",
    "caplet": "7b7b7b10ce980355",
    "tablet": "0afc61029f558eee",
    "ic": "59b3d358899a000a",
    "gear": "9a934f8eed9d9f12",
}


def _probe_hashes(**env: str) -> dict[str, str]:
    root = str(Path(synthetic.__file__).parents[3])
    run = subprocess.run([sys.executable, "-c", HASH_PROBE], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": root, **env}, check=True)  # fmt: skip
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def native_hashes() -> dict[str, str]:
    return _probe_hashes()


def test_images_do_not_depend_on_numpys_vector_kernels(native_hashes: dict[str, str]) -> None:
    """numpy with every dispatched instruction set above its baseline switched off (on this
    machine: what an older CPU runs) gives the same images as numpy at full width."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    narrow = _probe_hashes(NPY_DISABLE_CPU_FEATURES=" ".join(__cpu_dispatch__))
    assert narrow == native_hashes


def test_images_hash_to_the_committed_bytes(native_hashes: dict[str, str]) -> None:
    differ = sorted(c for c in COMMITTED_HASHES if native_hashes.get(c) != COMMITTED_HASHES[c])
    assert not differ, (
        f"the synthetic images of {differ} are not the committed bytes on this CPU "
        f"({native_hashes}): the committed study will not reproduce here"
    )
