from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ccnf.config import FlowConfig, ScoreConfig
from ccnf.errors import CcnfError
from ccnf.flows import CCNF
from ccnf.flows.ccnf import LevelOutput
from ccnf.models.ccnf import ccnf_spec
from ccnf.models.ccnf_scores import (
    calibration_patches,
    class_statistics,
    patch_scores,
    select_classes,
)
from ccnf.patch_scores import PatchScores
from ccnf.scoring import (
    assemble,
    calibration_record,
    fusion_stats_of,
    gaussian_blur,
    image_scores,
    pixel_maps,
    pool,
    score_names,
    stack_stats,
    thresholds,
    unit_fusion_stats,
)


def test_blur_keeps_constants_and_mass_centre() -> None:
    flat = torch.full((2, 16, 16), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 17, 17)
    spike[0, 8, 8] = 1.0
    out = gaussian_blur(spike, 1.5)[0]
    assert int(out.argmax()) == 8 * 17 + 8
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert gaussian_blur(spike, 0.0) is spike


def test_pooling_modes() -> None:
    maps = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10)
    assert pool(maps, ScoreConfig(pooling="max")).tolist() == [99.0, 199.0]
    assert pool(maps, ScoreConfig(pooling="mean")).tolist() == [49.5, 149.5]
    top = pool(maps, ScoreConfig(pooling="topk", topk_ratio=0.05))
    assert top.tolist() == [97.0, 197.0]  # mean of the 5 largest


def _scored(power: int = 2, fusion: str = "mean"):
    """A small random CCNF, 3 images and their Scores (calibrated on themselves)."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4)
    model = CCNF([5, 7], [[4, 4], [2, 2]], ccnf_spec(cfg, [5, 7]), n_classes=2)
    feats = [torch.randn(3, 5, 4, 4), torch.randn(3, 7, 2, 2)]
    sc = ScoreConfig(proto_power=power, smoothing_sigma=0.0, level_fusion=fusion)
    patches = patch_scores(model, feats, torch.tensor([0, 1, 1]), 2)
    record = calibration_record(patches.to_record(), sc, 8)
    st = stack_stats({"c": record}, ["c"] * 3)
    return model, feats, assemble(patches, sc, 8, fusion_stats_of(st))


def _stats(power: int = 2) -> dict:
    """The calibration record of the 3 images of :func:`_scored` (mean level fusion)."""
    model, feats, _ = _scored(power)
    patches = patch_scores(model, feats, torch.tensor([0, 1, 1]), 2)
    return calibration_record(patches.to_record(), ScoreConfig(proto_power=power,
                              smoothing_sigma=0.0), 8)


def test_scores_match_direct_flow_evaluation() -> None:
    model, feats, s = _scored()
    assert s.maps["nf"].shape == (3, 8, 8) and s.images["proto"].shape == (3,)
    # check the proto image score by hand, level by level
    want = []
    for i, y in enumerate([0, 1, 1]):
        per_level = []
        for lvl, f in enumerate(feats):
            d, h, w = f.shape[1:]
            x = f[i].flatten(1).t()
            out = model.forward_level(lvl, x, torch.full((h * w,), y), torch.arange(h * w))
            mu = model.prototype(lvl, torch.tensor([y]))[0]
            per_level.append(float((out.z.mean(0) - mu).pow(2).sum().detach() / d))
        want.append(np.mean(per_level))
    np.testing.assert_allclose(s.images["proto"], want, rtol=1e-5)
    _, _, s1 = _scored(power=1)
    np.testing.assert_allclose(s1.images["proto"], np.sqrt(want), rtol=1e-5)


def test_latent_score_equals_direct_computation() -> None:
    """latent patch score = 0.5 ||z - mu||^2 / D (no log-det), mu the prior mean; its map is
    the mean of the upsampled levels and its image score the map's maximum."""
    model, feats, s = _scored()
    for i, y in enumerate([0, 1, 1]):
        levels = []
        for lvl, f in enumerate(feats):
            d, h, w = f.shape[1:]
            out = model.forward_level(lvl, f[i].flatten(1).t(), torch.full((h * w,), y),
                                      torch.arange(h * w))
            patch = (0.5 * out.z.detach().pow(2).sum(-1) / d).view(1, 1, h, w)
            assert not torch.allclose(patch, (-out.log_prob.detach() / d).view(1, 1, h, w))
            levels.append(torch.nn.functional.interpolate(
                patch, size=(8, 8), mode="bilinear", align_corners=False))
        want = torch.cat(levels, dim=1).mean(dim=1)[0].numpy()
        np.testing.assert_allclose(s.maps["latent"][i], want, rtol=1e-5, atol=1e-6)
        assert s.images["latent"][i] == pytest.approx(float(want.max()), rel=1e-6)


def test_latent_score_centres_on_the_class_mixture_prior() -> None:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4,
                     prior="class_mixture")
    model = CCNF([5], [[2, 2]], ccnf_spec(cfg, [5]), n_classes=2)
    feats = [torch.randn(2, 5, 2, 2)]
    lat = patch_scores(model, feats, torch.tensor([1, 1]), 2).levels["latent"][0]
    out = model.forward_level(0, feats[0][0].flatten(1).t(), torch.full((4,), 1),
                              torch.arange(4))
    mu = model.prototype(0, torch.tensor([1]))[0]
    want = 0.5 * (out.z - mu).pow(2).sum(-1).detach() / 5
    torch.testing.assert_close(lat[0].flatten(), want)


def test_standardized_fusion_reads_only_calibration_statistics() -> None:
    """Each level becomes (s - m_l) / sd_l with the calibration patches' statistics: the map
    follows the calibration record and nothing else (not the test images' own statistics)."""
    model, feats, _ = _scored()
    sc = ScoreConfig(smoothing_sigma=0.0, level_fusion="standardized")
    calib_feats = [f[:2] * 1.5 for f in feats]  # 2 "normal" images, other than the test ones
    cal = calibration_record(
        patch_scores(model, calib_feats, torch.tensor([1, 1]), 2).to_record(), sc, 8
    )
    test = patch_scores(model, feats, torch.tensor([1, 1, 1]), 2)
    got = assemble(test, sc, 8, fusion_stats_of(stack_stats({"c": cal}, ["c"] * 3)))
    # by hand, from the calibration patches' own mean/std per level (ddof=0)
    calib = patch_scores(model, calib_feats, torch.tensor([1, 1]), 2)
    up = []
    for lvl in range(2):
        ref = calib.levels["latent"][lvl].double()
        m, sd = float(ref.mean()), float(ref.std(unbiased=False))
        assert cal["levels"]["latent"][lvl] == pytest.approx([m, sd])
        z = (test.levels["latent"][lvl] - m) / sd
        up.append(torch.nn.functional.interpolate(z.float(), size=(8, 8), mode="bilinear",
                                                  align_corners=False))
    want = torch.cat(up, dim=1).mean(dim=1).numpy()
    np.testing.assert_allclose(got.maps["latent"], want, rtol=1e-5, atol=1e-5)
    # different test images: the statistics stay the calibration's
    other = patch_scores(model, [f * 3 for f in feats], torch.tensor([1, 1, 1]), 2)
    again = assemble(other, sc, 8, fusion_stats_of(stack_stats({"c": cal}, ["c"] * 3)))
    assert not np.allclose(again.maps["latent"], got.maps["latent"])
    shifted = {**cal, "levels": {s: [[m + 1.0, sd] for m, sd in lv]
                                 for s, lv in cal["levels"].items()}}
    moved = assemble(test, sc, 8, fusion_stats_of(stack_stats({"c": shifted}, ["c"] * 3)))
    # (s - (m + 1)) / sd = z - 1 / sd at every level: the map moves by the level mean of 1/sd
    drop = np.mean([1.0 / lv[1] for lv in cal["levels"]["latent"]])
    np.testing.assert_allclose(moved.maps["latent"], got.maps["latent"] - drop, rtol=1e-5,
                               atol=1e-5)
    assert np.all(moved.maps["latent"] < got.maps["latent"])
    with pytest.raises(ValueError, match="calibration"):
        assemble(test, sc, 8, None)


def test_batching_does_not_change_scores() -> None:
    model, feats, _ = _scored()
    a = patch_scores(model, feats, torch.tensor([0, 1, 1]), 2)
    b = patch_scores(model, feats, torch.tensor([0, 1, 1]), 3)
    for s in a.levels:
        for x, y in zip(a.levels[s], b.levels[s], strict=True):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


def test_hybrid_is_weighted_sum_of_calibrated_scores() -> None:
    _, _, s = _scored()
    stats = _stats()
    img = image_scores(s, stats, alpha=0.3)
    z_nf = (s.images["nf"] - stats["nf_image"][0]) / stats["nf_image"][1]
    z_pr = (s.images["proto"] - stats["proto_image"][0]) / stats["proto_image"][1]
    np.testing.assert_allclose(img["hybrid"], 0.3 * z_pr + 0.7 * z_nf)
    maps = pixel_maps(s, stats, alpha=1.0)
    want = (s.maps["proto"] - stats["proto_pixel"][0]) / stats["proto_pixel"][1]
    np.testing.assert_allclose(maps["hybrid"], want, rtol=1e-5, atol=1e-5)
    assert set(img) == {"nf", "latent", "proto", "hybrid"}


# -- calibration, calibrated scores, thresholds ---------------------------------------------------


def test_calibration_stats_keep_raw_image_scores() -> None:
    _, _, s = _scored()
    stats = _stats()
    for name in ("nf", "latent", "proto"):
        assert stats[f"{name}_image_values"] == pytest.approx(s.images[name].tolist(), abs=0)
    assert stats["nf_image"][0] == pytest.approx(np.mean(stats["nf_image_values"]))
    assert stats["proto_pixel"][1] == pytest.approx(
        float(s.maps["proto"].astype(np.float64).std())
    )


def test_bank_calibration_record_has_no_proto() -> None:
    model, feats, _ = _scored()
    patches = patch_scores(model, feats, torch.tensor([1, 1, 1]), 2).to_record()
    full = calibration_record(patches, ScoreConfig(), 8)
    bank = calibration_record({k: patches[k] for k in ("nf", "latent")}, ScoreConfig(), 8)
    assert score_names(bank) == ["nf", "latent"]
    assert score_names(full) == ["nf", "latent", "proto", "hybrid"]
    positions = {"positions": None}
    assert bank | positions == {k: v for k, v in full.items() if not k.startswith("proto")} | {
        "levels": {k: v for k, v in full["levels"].items() if k != "proto"}} | positions
    assert list(bank["positions"]) == ["nf", "latent"]
    for s in ("nf", "latent"):
        for mine, theirs in zip(bank["positions"][s], full["positions"][s], strict=True):
            np.testing.assert_array_equal(mine, theirs)


def test_calibrated_scores_are_standardized() -> None:
    _, _, s = _scored()
    stats = _stats()
    raw = image_scores(s, stats, alpha=0.4)
    cal = image_scores(s, stats, alpha=0.4, calibrated=True)
    nf_z = (s.images["nf"] - stats["nf_image"][0]) / stats["nf_image"][1]
    np.testing.assert_allclose(cal["nf"], nf_z)
    np.testing.assert_allclose(
        cal["proto"], (s.images["proto"] - stats["proto_image"][0]) / stats["proto_image"][1]
    )
    # standardized on the images the statistics came from: mean 0, std 1
    assert cal["nf"].mean() == pytest.approx(0.0, abs=1e-9)
    assert cal["latent"].std() == pytest.approx(1.0)
    np.testing.assert_array_equal(raw["nf"], s.images["nf"])  # off: raw scores
    np.testing.assert_array_equal(cal["hybrid"], raw["hybrid"])  # hybrid is always calibrated
    maps = pixel_maps(s, stats, alpha=0.4, calibrated=True)
    want = (s.maps["nf"] - stats["nf_pixel"][0]) / stats["nf_pixel"][1]
    np.testing.assert_allclose(maps["nf"], want, rtol=1e-5, atol=1e-5)
    assert maps["nf"].dtype == np.float32


def test_per_image_statistics_apply_row_by_row() -> None:
    _, _, s = _scored()
    a = _stats()
    b = {k: ([v[0] + 1.0, v[1] * 2.0] if k.endswith(("_image", "_pixel")) else v)
         for k, v in a.items()}
    per_image = stack_stats({"a": a, "b": b}, ["a", "b", "a"])
    assert per_image["nf_image"].shape == (3, 2)
    assert per_image["levels/nf"].shape == (3, 2, 2)
    got = image_scores(s, per_image, alpha=0.5, calibrated=True)
    for i, rec in enumerate([a, b, a]):
        want = image_scores(s, rec, alpha=0.5, calibrated=True)
        for name in ("nf", "latent", "proto", "hybrid"):
            assert got[name][i] == pytest.approx(want[name][i], abs=1e-12)
    maps = pixel_maps(s, per_image, alpha=0.5)
    np.testing.assert_allclose(maps["hybrid"][1], pixel_maps(s, b, alpha=0.5)["hybrid"][1])


def test_thresholds_against_direct_computation() -> None:
    rng = np.random.default_rng(0)
    nf, proto = rng.normal(3.0, 0.5, size=11), rng.gamma(2.0, 0.1, size=11)
    stats = {
        "nf_image": [float(nf.mean()), float(nf.std())],
        "proto_image": [float(proto.mean()), float(proto.std())],
        "nf_image_values": nf.tolist(),
        "proto_image_values": proto.tolist(),
    }
    thr = thresholds(stats, alpha=0.25, calibrated=False, k=3.0, percentile=95.0)
    hybrid = 0.25 * (proto - proto.mean()) / proto.std() + 0.75 * (nf - nf.mean()) / nf.std()
    for name, v in (("nf", nf), ("proto", proto), ("hybrid", hybrid)):
        assert thr[name]["kstd"] == pytest.approx(v.mean() + 3.0 * v.std(ddof=0))
        assert thr[name]["pct"] == pytest.approx(float(np.percentile(v, 95.0)), rel=1e-12)
    # by hand: 11 values, the 95th percentile lies at rank 0.95 * 10 = 9.5 (linear interpolation)
    ranked = np.sort(nf)
    assert thr["nf"]["pct"] == pytest.approx(0.5 * (ranked[9] + ranked[10]))
    cal = thresholds(stats, alpha=0.25, calibrated=True, k=3.0, percentile=95.0)
    assert cal["nf"]["kstd"] == pytest.approx(3.0)  # mean 0, std 1 after standardizing
    assert cal["proto"]["pct"] == pytest.approx(
        (thr["proto"]["pct"] - proto.mean()) / proto.std()
    )


def test_checkpoint_without_raw_calibration_values_is_a_user_error() -> None:
    old = {k: v for k, v in _stats().items() if not k.endswith("_values")}
    with pytest.raises(CcnfError, match="dvc repro") as info:
        thresholds(old, 0.5, False, 3.0, 99.0, cls="weave", where="models/t0/model.pt")
    assert "weave" in str(info.value) and "models/t0/model.pt" in str(info.value)


# -- class selection ----------------------------------------------------------------------------


class _GaussianStub(torch.nn.Module):
    """A stand-in 'flow' with a known answer: z = x, log p(x|y) = log N(x; m_y, I), mu_y = m_y."""

    def __init__(self, means: list[torch.Tensor]) -> None:
        super().__init__()
        self.means = means  # means[l]: (C, D_l)

    @property
    def n_levels(self) -> int:
        return len(self.means)

    def forward_level(
        self, level: int, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor
    ) -> LevelOutput:
        m = self.means[level][y]
        lp = -0.5 * (x - m).pow(2).sum(-1)
        return LevelOutput(z=x, logdet=torch.zeros(len(x)), scale_sq=torch.zeros(len(x)),
                           log_prob=lp)

    def prototype(self, level: int, y: torch.Tensor) -> torch.Tensor:
        return self.means[level][y]


def test_selection_picks_the_class_whose_density_fits() -> None:
    gen = torch.Generator().manual_seed(0)
    n_classes, dims, grids = 4, [3, 5], [(4, 4), (2, 2)]
    means = [3.0 * torch.randn(n_classes, d, generator=gen) for d in dims]
    truth = torch.tensor([2, 0, 3, 1, 1, 2, 0])
    feats = [
        (means[lvl][truth][:, :, None, None]
         + 0.3 * torch.randn(len(truth), d, h, w, generator=gen))
        for lvl, (d, (h, w)) in enumerate(zip(dims, grids, strict=True))
    ]
    stub: Any = _GaussianStub(means)
    # candidates in a shuffled order: the result must be class ids, not column indices
    cands = torch.tensor([3, 1, 0, 2])
    for method in ("likelihood", "prototype"):
        selected, stat = select_classes(stub, feats, cands, method, batch_images=3, level=None)
        np.testing.assert_array_equal(selected, truth.numpy())
        assert stat.shape == (7, 4)
    stats = class_statistics(stub, feats, cands, batch_images=2, level=None)
    # statistic by hand for image 0 under candidate column 1 (class 1)
    want_ll, want_pd = [], []
    for lvl, d in enumerate(dims):
        x = feats[lvl][0].flatten(1).t()
        m = means[lvl][1]
        want_ll.append(float((-0.5 * (x - m).pow(2).sum(-1) / d).mean()))
        want_pd.append(float((x.mean(0) - m).pow(2).sum() / d))
    assert stats.log_lik[0, 1] == pytest.approx(np.mean(want_ll), rel=1e-5)
    assert stats.proto_dist[0, 1] == pytest.approx(np.mean(want_pd), rel=1e-5)
    # the model is never run for the oracle
    no_model: Any = None
    sel, onehot = select_classes(no_model, feats, cands, "oracle", 3, true_ids=truth)
    np.testing.assert_array_equal(sel, truth.numpy())
    np.testing.assert_array_equal(cands.numpy()[onehot.argmax(1)], truth.numpy())


def test_class_statistics_match_per_image_flow_passes() -> None:
    model, feats, _ = _scored()
    model.add_classes(1)
    stats = class_statistics(model, feats, torch.arange(3), batch_images=2, level=None)
    assert stats.log_lik.shape == (3, 3) and stats.proto_dist.shape == (3, 3)
    for i in range(3):
        for c in range(3):
            ll, pd = [], []
            for lvl, f in enumerate(feats):
                d, h, w = f.shape[1:]
                x = f[i].flatten(1).t()
                y = torch.full((h * w,), c)
                out = model.forward_level(lvl, x, y, torch.arange(h * w))
                mu = model.prototype(lvl, torch.tensor([c]))[0]
                ll.append(float(out.log_prob.detach().mean() / d))
                pd.append(float((out.z.detach().mean(0) - mu.detach()).pow(2).sum() / d))
            assert stats.log_lik[i, c] == pytest.approx(np.mean(ll), rel=1e-5, abs=1e-6)
            assert stats.proto_dist[i, c] == pytest.approx(np.mean(pd), rel=1e-5, abs=1e-7)
    np.testing.assert_array_equal(stats.select("likelihood"), stats.log_lik.argmax(1))
    np.testing.assert_array_equal(stats.select("prototype"), stats.proto_dist.argmin(1))


def test_calibration_record_from_patches_equals_direct_statistics() -> None:
    """The checkpoint stores patch scores; statistics for any score.* follow from them."""
    model, feats, _ = _scored()
    patches = calibration_patches(model, feats, 1, batch_images=2)
    for sc in (ScoreConfig(smoothing_sigma=1.0), ScoreConfig(pooling="mean", proto_power=1)):
        scores = assemble(patch_scores(model, feats, torch.full((3,), 1), 2), sc, 8)
        got = calibration_record(patches, sc, 8)
        for name, values in scores.images.items():
            np.testing.assert_allclose(got[f"{name}_image_values"], values, rtol=1e-6)
            assert got[f"{name}_image"] == pytest.approx(
                [values.mean(), values.std()], rel=1e-6)
        for name, maps in scores.maps.items():
            assert got[f"{name}_pixel"] == pytest.approx(
                [maps.astype(np.float64).mean(), maps.astype(np.float64).std()], rel=1e-5)
    with pytest.raises(CcnfError, match="predates"):
        calibration_record({"nf_image": [0.0, 1.0]}, ScoreConfig(), 8)


def test_selection_level_uses_only_that_level() -> None:
    model, feats, _ = _scored()
    model.add_classes(1)
    deep = class_statistics(model, feats, torch.arange(3), batch_images=2, level=-1)
    last = class_statistics(model, feats, torch.arange(3), batch_images=2, level=len(feats) - 1)
    first = class_statistics(model, feats, torch.arange(3), batch_images=2, level=0)
    both = class_statistics(model, feats, torch.arange(3), batch_images=2, level=None)
    np.testing.assert_array_equal(deep.log_lik, last.log_lik)
    np.testing.assert_allclose(both.log_lik, (first.log_lik + last.log_lik) / 2, rtol=1e-6)
    assert not np.allclose(first.log_lik, last.log_lik)


def test_blur_runs_on_the_device_of_its_maps(monkeypatch) -> None:
    """The kernel was built on the CPU whatever the maps' device (a CUDA error in ccnf bench);
    the meta device stands in for the GPU (torch lets meta and CPU tensors meet, CUDA does not,
    so the kernel's device is checked where it meets the maps)."""
    import torch.nn.functional as F

    conv = F.conv2d
    seen = []

    def spy(x, weight, *args, **kwargs):
        seen.append((x.device.type, weight.device.type))
        return conv(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    out = gaussian_blur(torch.zeros(2, 16, 16, device="meta"), 1.5)
    assert out.device.type == "meta" and out.shape == (2, 16, 16)
    assert seen == [("meta", "meta")] * 2


def _level_record(calib: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """A baseline-like calibration record: the same per-level patch scores for nf and latent."""
    return {"nf": calib, "latent": [c.clone() for c in calib]}


def test_position_fusion_subtracts_each_positions_calibration_mean() -> None:
    """Level l at position p becomes (s_p - m_{l,p}) / r_l: m the mean over the calibration
    images at p, r the std of the residuals over all their patches of the level (ddof=0)."""
    gen = torch.Generator().manual_seed(0)
    calib = [torch.rand(5, 1, 4, 4, generator=gen) * torch.arange(16.0).view(1, 1, 4, 4),
             torch.rand(5, 1, 2, 2, generator=gen)]
    test = PatchScores({"nf": [torch.rand(3, 1, 4, 4, generator=gen),
                               torch.rand(3, 1, 2, 2, generator=gen)]})
    sc = ScoreConfig(smoothing_sigma=0.0, level_fusion="position")
    cal = calibration_record(_level_record(calib), sc, 8)
    got = assemble(test, sc, 8, fusion_stats_of(stack_stats({"c": cal}, ["c"] * 3)))
    up = []
    for lvl, ref in enumerate(calib):
        m = ref.double().mean(dim=0, keepdim=True)
        r = float((ref.double() - m).std(unbiased=False))
        np.testing.assert_allclose(cal["positions"]["nf"][lvl][0], m[0, 0].numpy())
        np.testing.assert_allclose(cal["positions"]["nf"][lvl][1], r)
        z = ((test.levels["nf"][lvl].double() - m) / r).float()
        up.append(torch.nn.functional.interpolate(z, size=(8, 8), mode="bilinear",
                                                  align_corners=False))
    want = torch.cat(up, dim=1).mean(dim=1).numpy()
    np.testing.assert_allclose(got.maps["nf"], want, rtol=1e-5, atol=1e-5)
    # the calibration images' own residual maps have mean 0 at every position
    own = assemble(PatchScores({"nf": calib}), ScoreConfig(smoothing_sigma=0.0,
                   level_fusion="position"), 4,
                   fusion_stats_of(stack_stats({"c": cal}, ["c"] * 5)))
    assert abs(float(own.maps["nf"].mean())) < 1e-5


def test_position_fusion_ignores_a_place_that_is_always_high() -> None:
    """Normal images whose patch scores are always high at one place (an edge, a fixed part):
    with one mean per level their image score is that place's, so a smaller defect elsewhere
    ranks below them; with a mean per position the defect ranks first."""
    gen = torch.Generator().manual_seed(1)

    def images(n: int) -> torch.Tensor:
        x = 0.1 * torch.randn(n, 1, 8, 8, generator=gen)
        x[:, :, 0, 0] += 5.0  # the place that is always high
        return x

    calib = images(8)
    good, bad = images(1), images(1)
    bad[:, :, 5, 5] += 2.0  # a defect, weaker than the fixed place
    test = PatchScores({"nf": [torch.cat([good, bad])]})
    cal_for = {f: calibration_record(_level_record([calib]),
                                     ScoreConfig(smoothing_sigma=0.0, level_fusion=f), 8)
               for f in ("standardized", "position")}
    img = {}
    for fusion, cal in cal_for.items():
        sc = ScoreConfig(smoothing_sigma=0.0, level_fusion=fusion)
        img[fusion] = assemble(test, sc, 8,
                               fusion_stats_of(stack_stats({"c": cal}, ["c"] * 2))).images["nf"]
    assert img["standardized"][0] >= img["standardized"][1]
    assert img["position"][1] > img["position"][0] + 5.0


def test_position_fusion_refuses_a_single_calibration_image() -> None:
    sc = ScoreConfig(level_fusion="position")
    with pytest.raises(CcnfError, match="calib_fraction"):
        calibration_record(_level_record([torch.rand(1, 1, 4, 4)]), sc, 8, cls="one")
    # the other fusions can still use it
    calibration_record(_level_record([torch.rand(1, 1, 4, 4)]), ScoreConfig(), 8)


def test_unit_fusion_statistics_equal_the_mean_fusion() -> None:
    gen = torch.Generator().manual_seed(2)
    test = PatchScores({"nf": [torch.rand(2, 1, 4, 4, generator=gen),
                               torch.rand(2, 1, 2, 2, generator=gen)]})
    plain = assemble(test, ScoreConfig(level_fusion="mean"), 8)
    for fusion in ("standardized", "position"):
        unit = unit_fusion_stats(2, [(4, 4), (2, 2)], ("nf",))
        got = assemble(test, ScoreConfig(level_fusion=fusion), 8, unit)
        np.testing.assert_array_equal(got.maps["nf"], plain.maps["nf"])
