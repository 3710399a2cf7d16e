"""The 1-NN difficulty check runs end to end on a tiny generated set and its helpers are exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from ccnf.config import SyntheticConfig
from ccnf.data.calibration import (
    KnnReport,
    anomaly_maps,
    knn_check,
    nn_distance,
    pooled_distances,
)
from ccnf.data.synthetic import CLASS_INFO, generate
from ccnf.errors import CcnfError

CLASSES = ["weave", "washer", "caplet"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> KnnReport:
    root = tmp_path_factory.mktemp("calib") / "data"
    cfg = SyntheticConfig(image_size=64, n_train=4, n_test_good=2, n_test_defect=4, seed=0)
    generate(root, cfg, progress=False)
    return knn_check(
        root, CLASSES, image_size=64, mask_size=32, pooled_per_class=64, progress=False
    )


def test_calibration_nn_distance_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(300, 17, generator=gen), torch.randn(1000, 17, generator=gen)
    got = nn_distance(queries, memory, q_chunk=64, m_chunk=128)
    want = torch.cdist(queries.double(), memory.double()).min(dim=1).values.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a query that is in the memory has distance (about) zero
    assert nn_distance(memory[:5], memory).max() < 1e-2


def test_calibration_anomaly_maps_shape_and_smoothing() -> None:
    dist = torch.zeros(2, 16)
    dist[1, 5] = 1.0  # one hot patch on a 4x4 grid
    maps = anomaly_maps(dist, (4, 4), 32)
    assert maps.shape == (2, 32, 32)
    assert np.allclose(maps[0], 0)
    assert maps[1].max() < 1.0 and maps[1].max() > 0  # blurred, not erased


def test_calibration_knn_check_runs_on_a_tiny_set(tiny_report: KnnReport) -> None:
    r = tiny_report
    assert [c.name for c in r.classes] == CLASSES
    for c in r.classes:
        for value in (c.image_auroc, c.pixel_auroc, c.pooled_image_auroc, c.pooled_pixel_auroc):
            assert math.isfinite(value) and 0.0 <= value <= 1.0
        assert (c.n_train, c.n_test_good, c.n_test_defect) == (4, 2, 4)
        assert set(c.defect_image_auroc) == set(CLASS_INFO[c.name].defects)
        assert all(0.0 <= v <= 1.0 for v in c.defect_image_auroc.values())
    assert r.feature_dim == 40 + 112 and r.levels == [2, 3]
    assert r.pooled_per_class == 64 and r.pooled_full_classes == 2
    for c in r.classes:
        assert len(c.pooled_nearest) == 2 and c.name not in c.pooled_nearest
        # a pooled memory contains the own class: it can only lower the distances
        assert c.pooled_image_auroc <= 1.0
    assert 0 <= r.n_perfect <= len(CLASSES)
    assert math.isclose(r.pooled_drop, r.mean_image_auroc - r.pooled_mean_image_auroc)


def test_calibration_report_serialises(tiny_report: KnnReport) -> None:
    d = json.loads(json.dumps(tiny_report.to_dict()))
    for key in (
        "mean_image_auroc",
        "mean_pixel_auroc",
        "n_image_auroc_1",
        "pooled_mean_image_auroc",
        "pooled_image_auroc_drop",
        "classes",
        "seconds",
    ):
        assert key in d
    assert set(d["classes"]) == set(CLASSES)
    assert set(d["classes"]["washer"]) >= {"image_auroc", "pixel_auroc", "pooled_image_auroc"}
    console = Console(record=True, width=120)
    console.print(tiny_report.to_table())
    text = console.export_text()
    assert "washer" in text and "mean" in text


def test_calibration_pooled_distances_never_exceed_own_and_keep_image_max() -> None:
    gen = torch.Generator().manual_seed(1)
    memories = {c: torch.randn(200, 8, generator=gen) + i for i, c in enumerate("abc")}
    subsamples = {c: m[:50] for c, m in memories.items()}
    queries = torch.randn(3, 16, 8, generator=gen) + 1.0
    own = nn_distance(queries.reshape(-1, 8), memories["a"]).view(3, 16)
    pooled, full = pooled_distances(queries, own, "a", memories, subsamples, full_classes=1)
    assert full in (["b"], ["c"])
    assert bool((pooled <= own + 1e-6).all())
    # each image's maximum equals the brute-force maximum over the searched memory
    searched = torch.cat([memories["a"], memories[full[0]], *(subsamples[c] for c in "bc")])
    exact = nn_distance(queries.reshape(-1, 8), searched).view(3, 16)
    torch.testing.assert_close(pooled.amax(dim=1), exact.amax(dim=1), rtol=1e-5, atol=1e-5)


def test_calibration_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CcnfError, match="does not exist"):
        knn_check(tmp_path / "nope", ["weave"], progress=False)
