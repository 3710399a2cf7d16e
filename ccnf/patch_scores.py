"""What every model's scoring gives: per-level patch scores of a batch of images.

A model (any ``model.kind``, :mod:`ccnf.models`) turns cached features into
:class:`PatchScores`; :mod:`ccnf.scoring` turns those into maps, image scores, calibration
statistics and thresholds, the same way for every model. The record sits below both so that
neither the models nor the baselines import the evaluation layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ccnf.names import MAP_SCORES


@dataclass
class PatchScores:
    """Per-level patch scores of B images (float32, CPU).

    levels[s][l]: (B, 1, H_l, W_l) for every map score s; proto_image: (B,) mean over levels of
    ||zbar_l - mu_l||^2 / D_l (before ``proto_power``), None for a baseline.
    """

    levels: dict[str, list[torch.Tensor]]
    proto_image: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[PatchScores]) -> PatchScores:
        names = list(parts[0].levels)
        n_levels = len(parts[0].levels[names[0]])
        levels = {
            s: [torch.cat([p.levels[s][lvl] for p in parts]) for lvl in range(n_levels)]
            for s in names
        }
        proto = None
        if parts[0].proto_image is not None:
            proto = torch.cat([p.proto_image for p in parts])
        return PatchScores(levels, proto)

    def to_record(self) -> dict[str, Any]:
        """Plain dict for a checkpoint: {score: [per-level tensors]}, + "proto_image"."""
        out: dict[str, Any] = {s: [t.float().cpu() for t in lv] for s, lv in self.levels.items()}
        if self.proto_image is not None:
            out["proto_image"] = self.proto_image.float().cpu()
        return out

    @staticmethod
    def from_record(record: dict[str, Any]) -> PatchScores:
        levels = {s: record[s] for s in MAP_SCORES if s in record}
        return PatchScores(levels, record.get("proto_image"))
