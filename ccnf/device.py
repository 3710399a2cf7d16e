"""Where tensors run: ``device`` in params.yaml (``auto`` | ``cpu`` | ``cuda``).

``auto`` takes the first CUDA GPU when torch sees one and the CPU otherwise; ``cuda`` insists
on a GPU and is an error without one (never a silent fall-back, so a run that was meant for a
GPU does not quietly take hours on the CPU). The CPU is the reference: the committed features
and metrics are CPU results, and a GPU run may differ in the last bits of floating point.
"""

from __future__ import annotations

import os
import platform

import torch

from ccnf.errors import CcnfError
from ccnf.kernels import pin_cpu_convolutions

SETTINGS = ("auto", "cpu", "cuda")


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device for a ``device`` setting; ``cuda`` without a usable GPU is an error."""
    if setting not in SETTINGS:
        raise CcnfError(
            f"unknown device '{setting}'",
            where="params.yaml: device",
            fix=f"use one of {', '.join(SETTINGS)}",
        )
    available = setting != "cpu" and torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not available):
        pin_cpu_convolutions()
        return torch.device("cpu")
    if setting == "auto":
        return deterministic_cuda()
    if not available:
        built = torch.version.cuda
        raise CcnfError(
            "device 'cuda' requested but torch sees no CUDA GPU"
            + ("" if built else " (this torch build has no CUDA support)"),
            where="params.yaml: device",
            fix="set device: auto (GPU when available, else CPU) or device: cpu, e.g. "
            "dvc exp run -S device=cpu; or install a CUDA build of torch and check nvidia-smi"
            + (f" (this torch was built for CUDA {built})" if built else ""),
        )
    return deterministic_cuda()


def deterministic_cuda() -> torch.device:
    """The GPU, set up so that the same params give the same metrics on it run after run.

    CUDA's fastest kernels for scatter/index adds (prototypes, embedding gradients) and cuBLAS's
    split reductions sum in a different order on each run, and cuDNN's TF32 convolutions round
    the backbone's features to 10 mantissa bits; the study's determinism rule outweighs their
    speed here (the flow's small matrices gain little from either). An operation without a
    deterministic CUDA kernel warns rather than stopping the stage.
    """
    # read when cuBLAS makes its first handle: must be set before any matrix product
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    """A human-readable name of the device: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict[str, object]:
    """What a benchmark needs to say about where it ran."""
    info: dict[str, object] = {
        "type": device.type,
        "name": device_name(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "onednn_conv": torch.backends.mkldnn.enabled,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info
