"""ccnf.kernels: importing ccnf pins the CPU kernels that give the same bits on every x86-64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccnf.kernels import PORTABLE_KERNELS

PROBE = """
import hashlib, os, torch
import ccnf
torch.manual_seed(0); torch.set_num_threads(1)
a, b = torch.randn(300, 200), torch.randn(200, 100)
print(os.environ["MKL_CBWR"], os.environ["ATEN_CPU_CAPABILITY"],
      torch.backends.cpu.get_cpu_capability(), hashlib.md5((a @ b).numpy().tobytes()).hexdigest())
"""


def _run(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    return _run(PROBE, {**clean, **env})


def test_importing_ccnf_pins_the_portable_kernels_even_after_torch() -> None:
    """torch is imported first in the probe: the pin still holds, because both libraries read
    their setting when they first compute, and the product equals the one under the explicit
    environment."""
    cbwr, aten, capability, product = _probe()
    assert (cbwr, aten) == ("COMPATIBLE", "avx2")
    if "avx2" in Path("/proc/cpuinfo").read_text(encoding="utf-8"):
        assert capability == "AVX2"
    assert product == _probe(MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="avx2")[3]


def test_a_kernel_setting_from_the_environment_is_kept() -> None:
    cbwr, aten, _, _ = _probe(MKL_CBWR="AUTO")
    assert (cbwr, aten) == ("AUTO", "avx2")


def test_the_test_process_itself_runs_pinned() -> None:
    import torch

    if os.environ.get("MKL_CBWR") != "COMPATIBLE":
        pytest.skip("this pytest run was started with its own MKL_CBWR")
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


CONV_PROBE = """
import hashlib, torch
from ccnf.device import resolve_device
resolve_device("cpu")
torch.manual_seed(0); torch.set_num_threads(1)
conv = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1),
                           torch.nn.Conv2d(16, 16, 3, padding=1, groups=16))
with torch.no_grad():
    y = conv(torch.randn(2, 8, 40, 40))
print(torch.backends.mkldnn.enabled, hashlib.md5(y.numpy().tobytes()).hexdigest())
"""


def _conv_probe(**env: str) -> list[str]:
    return _run(CONV_PROBE, {**os.environ, **env})


def test_cpu_convolutions_do_not_depend_on_onednns_instruction_set() -> None:
    """oneDNN's JIT kernels differ by ISA in the last bits (its SSE4.1 and AVX2 kernels gave the
    backbone other float16 features): on the CPU device the convolutions run without it, so
    capping oneDNN's ISA changes nothing."""
    native = _conv_probe()
    assert native[0] == "False"
    for isa in ("SSE41", "AVX"):
        assert _conv_probe(ONEDNN_MAX_CPU_ISA=isa) == native
