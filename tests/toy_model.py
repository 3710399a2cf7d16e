"""A test-only model kind: each class is the mean patch vector of its training images, per level.

The whole of what a new model needs: this module (copied to ``ccnf/models/toy.py`` by
``tests/test_pipeline.py``) and one line in ``ccnf/models/registry.py``. Scores, per level:
nf = latent = 0.5 ||x_p - m_y||^2 / D_l (a unit-variance Gaussian around the class mean);
class selection picks the class with the smallest mean score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rich.console import Console

from ccnf.config import Params
from ccnf.features import FeatureMeta
from ccnf.models.base import AnomalyModel, TaskInputs
from ccnf.patch_scores import PatchScores


class ToyModel(AnomalyModel):
    kind = "toy"

    def __init__(self, means: dict[str, list[torch.Tensor]]) -> None:
        self.means = means  # {class: [(D_l,) per level]}

    @classmethod
    def create(cls, params: Params, meta: FeatureMeta) -> ToyModel:
        return cls({})

    @classmethod
    def restore(cls, ckpt: dict[str, Any], params: Params, meta: FeatureMeta | None,
                device: torch.device) -> ToyModel:
        return cls({c: list(ckpt["means"][c]) for c in ckpt["classes"]})

    def state(self) -> dict[str, Any]:
        return {"means": self.means}

    @property
    def classes(self) -> list[str]:
        return list(self.means)

    def learn_task(self, inputs: TaskInputs, params: Params, *,
                   console: Console | None = None) -> list[dict[str, float]]:
        for name, split in inputs.classes.items():
            self.means[name] = [f.float().mean(dim=(0, 2, 3)) for f in split.features]
        return []

    def _levels(self, features: list[torch.Tensor], classes: list[str]) -> list[torch.Tensor]:
        out = []
        for lvl, f in enumerate(features):
            mu = torch.stack([self.means[c][lvl] for c in classes])[:, :, None, None]
            out.append(0.5 * (f.float() - mu).pow(2).sum(1, keepdim=True) / f.shape[1])
        return out

    def patch_scores(self, features: list[torch.Tensor], classes: list[str],
                     batch_images: int) -> PatchScores:
        levels = self._levels(features, classes)
        return PatchScores({"nf": levels, "latent": [lv.clone() for lv in levels]})

    def select(self, features: list[torch.Tensor], candidates: list[str], batch_images: int,
               level: int | None) -> dict[str, np.ndarray]:
        n = features[0].shape[0]
        cost = torch.stack([
            torch.stack([lv.flatten(1).mean(1) for lv in self._levels(features, [c] * n)]).mean(0)
            for c in candidates
        ], dim=1)
        return {"likelihood": cost.argmin(dim=1).numpy()}
