"""CPU kernels that give the same bits on every x86-64 machine, so that CI reproduces REPORT.

Training a flow amplifies a difference in the last bit of one matrix product into a visible
change of the metrics after a few hundred steps, and two libraries under torch choose their
kernels by the CPU they find: MKL's matrix products take a vendor- and generation-specific code
path, and ATen's vectorized kernels the widest instruction set present. The same params and
packages gave image AUROC 0.8590 on one 2-core machine of this project and 0.8589 on another,
with per-class figures up to 0.05 apart. Pinned here:

- ``MKL_CBWR=COMPATIBLE``: MKL's one code path that runs alike on every x86-64 CPU (its other
  reproducibility branches hold only across Intel CPUs); about 1.3x the time of a training step;
- ``ATEN_CPU_CAPABILITY=avx2``: ATen's AVX2 kernels, present on every x86-64 CPU of the last
  decade (a CPU without AVX2 runs its best lower level, and its figures may differ);
- oneDNN off for CPU convolutions (:func:`pin_cpu_convolutions`, when the device resolves to
  the CPU): oneDNN's JIT convolutions take the widest ISA too (the backbone's float16 features
  differed between its AVX2 and SSE4.1 kernels on one machine), and no setting of oneDNN is
  documented to give the same sums across CPU vendors. ATen's own convolution (im2col and an
  MKL product, pinned above) does; it costs the backbone about 1.6x (tf_efficientnet_lite0,
  32 images, one thread: 6.8 s against 4.3 s).

The two variables are read when the library first computes, so :func:`pin_portable_kernels`
runs when ``ccnf`` is imported (every stage, the CLI and the tests import it before computing).
A value already in the environment is kept: ``MKL_CBWR=AUTO`` trades the portability for speed.
"""

from __future__ import annotations

import os

PORTABLE_KERNELS: dict[str, str] = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}


def pin_portable_kernels() -> dict[str, str]:
    """Set each of :data:`PORTABLE_KERNELS` unless the environment has it; returns the
    values in effect (what ``ccnf info`` and the benchmarks report)."""
    for name, value in PORTABLE_KERNELS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in PORTABLE_KERNELS}


def pin_cpu_convolutions() -> None:
    """Route CPU convolutions through ATen's portable kernels (oneDNN off; CUDA untouched).

    Called by :func:`ccnf.device.resolve_device` whenever it picks the CPU, so every stage,
    the CLI and the benchmarks compute with it; imports torch, which importing ccnf does not.
    """
    import torch

    torch.backends.mkldnn.enabled = False
