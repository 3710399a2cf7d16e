from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_mvtec_root, tiny_params

from ccnf.backbone import Backbone
from ccnf.config import parse_params
from ccnf.data.images import load_image
from ccnf.data.manifest import index_root
from ccnf.device import device_info, resolve_device
from ccnf.errors import CcnfError
from ccnf.features import extract_features, load_split


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


def test_auto_without_gpu_is_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_gpu_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CcnfError) as err:
        resolve_device("cuda")
    assert err.value.where == "params.yaml: device"
    assert "device: cpu" in err.value.fix and "device: auto" in err.value.fix


def test_a_gpu_is_set_up_deterministically(monkeypatch) -> None:
    """On CUDA two identical training runs differed in the last bit (atomic adds, cuBLAS split
    reductions, TF32): choosing the GPU must switch on torch's deterministic algorithms."""
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a copy of the environment without the variable: restored whole after the test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k != "CUBLAS_WORKSPACE_CONFIG"})
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.allow_tf32 = True
        for setting in ("auto", "cuda"):
            assert resolve_device(setting) == torch.device("cuda")
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cudnn.allow_tf32 = saved[3]
        torch.backends.cuda.matmul.allow_tf32 = saved[4]


def test_unknown_setting() -> None:
    with pytest.raises(CcnfError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_params_reject_unknown_device(raw_params) -> None:
    raw_params["device"] = "gpu"
    with pytest.raises(CcnfError, match="device"):
        parse_params(raw_params)


def test_device_info_names_the_cpu() -> None:
    info = device_info(torch.device("cpu"))
    assert info["type"] == "cpu"
    assert isinstance(info["name"], str) and info["name"]
    assert info["torch_threads"] >= 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    root = make_mvtec_root(tmp / "ds", ["a", "b"], n_train=11, n_good=3, n_bad=2)
    raw = tiny_params(root, [["a", "b"]])
    raw["backbone"].update(weights="random", batch_size=4)  # 11 = 4 + 4 + 3: partial batches
    raw["device"] = "cpu"
    params = parse_params(raw)
    return tmp, raw, params, index_root(root, params.classes, progress=False)


def test_extraction_equals_the_direct_forward_in_order(tiny) -> None:
    """Prefetched decoding across classes/splits changes nothing: same batches, same order."""
    tmp, _, params, manifest = tiny
    extract_features(manifest, params, tmp / "features")
    torch.manual_seed(params.seed)
    backbone = Backbone(params.backbone)
    bs = params.backbone.batch_size
    for cls in params.classes:
        for split in ("train", "test"):
            records = manifest.select(cls, split)
            cached = load_split(tmp / "features", cls, split)
            assert cached.names == [r.image for r in records]
            for start in range(0, len(records), bs):
                batch = records[start : start + bs]
                imgs = np.stack([load_image(Path(manifest.root) / r.image, 64) for r in batch])
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
                for lvl, f in enumerate(backbone(x)):
                    got = cached.features[lvl][start : start + bs]
                    assert torch.equal(got, f.to(torch.float16))
            if split == "test":
                assert cached.masks is not None and cached.masks.shape[0] == len(records)
                assert cached.masks[cached.labels == 1].flatten(1).any(1).all()
                assert not cached.masks[cached.labels == 0].any()


def test_extraction_is_byte_identical_run_to_run(tiny) -> None:
    tmp, _, params, manifest = tiny
    extract_features(manifest, params, tmp / "f1", device=torch.device("cpu"))
    extract_features(manifest, params, tmp / "f2")
    for f in sorted((tmp / "f1").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (tmp / "f2" / f.relative_to(tmp / "f1")).read_bytes(), f


def test_extraction_asking_for_a_missing_gpu_fails_before_work(tiny, monkeypatch) -> None:
    tmp, raw, _, manifest = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = parse_params({**raw, "device": "cuda"})
    with pytest.raises(CcnfError, match="no CUDA GPU"):
        extract_features(manifest, params, tmp / "never")
    assert not (tmp / "never").exists()
