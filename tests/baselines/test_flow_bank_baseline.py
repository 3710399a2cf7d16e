"""Per-class CFlow-style flow: log p against autograd, determinism, learning."""

from __future__ import annotations

import math

import pytest
import torch

from ccnf.baselines import FlowBankModel
from ccnf.config import TrainConfig

CHANNELS = [4, 6]
GRIDS = [[4, 4], [2, 2]]


def _model(feature_norm: bool = False, spectral_norm: bool = True,
           position_mean: bool = False) -> FlowBankModel:
    return FlowBankModel(
        CHANNELS,
        GRIDS,
        n_couplings=[3, 3],
        hidden_dims=[16, 16],
        clamp_alpha=1.9,
        spectral_norm=spectral_norm,
        pos_dim=8,
        warmup_steps=4,
        feature_norm=feature_norm,
        position_mean=position_mean,
    )


def _feats(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, c, h, w, generator=g) * 4 + 2
        for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]


@pytest.mark.parametrize("feature_norm", [False, True])
def test_log_prob_matches_autograd_change_of_variables(feature_norm: bool) -> None:
    torch.manual_seed(0)
    model = _model(feature_norm)
    model.fit(
        _feats(6, 1),
        TrainConfig(epochs=1, images_per_step=3, patches_per_image=4),
        torch.Generator().manual_seed(0),
    )
    model = model.double().eval()
    x = torch.randn(3, 4, dtype=torch.double) * 3
    pos = torch.tensor([0, 5, 15])
    log_p, half_sq = model.level_log_prob(0, x, pos)
    for i in range(3):

        def to_z(v: torch.Tensor, i: int = i) -> torch.Tensor:
            mean, std = model.feat_mean_0, model.feat_std_0
            return model.flows[0](
                (v[None] - mean) / std, model.pos_0[pos[i : i + 1]].double(), model.warm()
            )[0][0]

        jac = torch.autograd.functional.jacobian(to_z, x[i])
        z = to_z(x[i])
        want = -0.5 * z.pow(2).sum() - 2 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_p[i], want, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(half_sq[i], 0.5 * z.pow(2).sum(), atol=1e-9, rtol=1e-9)
    if feature_norm:  # the standardisation is part of the density, not a free rescaling
        assert not torch.allclose(model.feat_std_0, torch.ones(4, dtype=torch.double))


def test_position_mean_subtracts_the_class_mean_map_at_each_position() -> None:
    """flow.class_norm_mean: position in the bank: the stored mean is the fit images' mean at
    every grid position and std that of the deviations from it; a vector at position p scores
    as the channel-mean model would with mean m(p) (same flow weights)."""
    torch.manual_seed(0)
    feats = _feats(6, 1)
    model = _model(feature_norm=True, position_mean=True)
    model.fit(feats, TrainConfig(epochs=1, images_per_step=3, patches_per_image=4),
              torch.Generator().manual_seed(0))
    maps = feats[0].flatten(2).transpose(1, 2)  # (N, P, D)
    torch.testing.assert_close(model.feat_mean_0, maps.mean(0))
    torch.testing.assert_close(model.feat_std_0, (maps - maps.mean(0)).reshape(-1, 4).std(0))
    channel = _model(feature_norm=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("feat_mean")}
    channel.load_state_dict(state, strict=False)
    model.eval(), channel.eval()
    x, pos = torch.randn(3, 4), torch.tensor([0, 5, 15])
    got = model.level_log_prob(0, x, pos)[0]
    for i in range(3):
        channel.feat_mean_0.copy_(model.feat_mean_0[pos[i]])
        want = channel.level_log_prob(0, x[i : i + 1], pos[i : i + 1])[0]
        torch.testing.assert_close(got[i : i + 1], want)
    # without the standardisation (feature_norm false) nothing is subtracted, map or not
    plain = _model(feature_norm=False, position_mean=True)
    assert not plain.position_mean and plain.feat_mean_0.shape == (4,)


def test_fit_is_deterministic_learns_and_scores_shapes() -> None:
    train = TrainConfig(epochs=15, images_per_step=4, patches_per_image=8, lr=3e-3)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = _model()
        rows = model.fit(_feats(8, 2), train, torch.Generator().manual_seed(11))
        runs.append((model, rows))
    (a, rows_a), (b, rows_b) = runs
    assert rows_a == rows_b and len(rows_a) == 15 * 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # past the warm-up transient (additive -> affine), the loss ends well below its start
    assert max(r["loss"] for r in rows_a[-4:]) < 0.8 * rows_a[0]["loss"]
    assert "pos_0" not in a.state_dict()  # recomputed from the grid, not checkpointed
    scores = a.patch_scores(_feats(2, 9))
    assert [tuple(s.shape) for s in scores["latent"]] == [(2, 1, 4, 4), (2, 1, 2, 2)]


def test_scoring_never_changes_the_model() -> None:
    torch.manual_seed(0)
    model = _model()
    model.fit(
        _feats(6, 1),
        TrainConfig(epochs=1, images_per_step=3, patches_per_image=4),
        torch.Generator().manual_seed(0),
    )
    model.train()  # even when a caller left it in train mode (spectral-norm power iteration)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.patch_scores(_feats(2, 5))
    second = model.patch_scores(_feats(2, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name in ("nf", "latent"):
        assert all(torch.equal(x, y) for x, y in zip(first[name], second[name], strict=True))


def test_mean_condition_gives_the_bank_the_content_of_its_mean_map() -> None:
    """flow.mean_condition_dim in the bank: the condition is [PE(p), A_l u(p)] with u(p) the
    class's centred mean map over its std, as CCNF's; log p is still the exact change of
    variables; the spec names the key only when it is on (checkpoints without it unchanged)."""
    torch.manual_seed(0)
    model = FlowBankModel(CHANNELS, GRIDS, n_couplings=[2, 2], hidden_dims=[8, 8],
                          clamp_alpha=1.9, spectral_norm=False, pos_dim=8, warmup_steps=0,
                          feature_norm=True, position_mean=True, mean_condition_dim=3)
    assert model.spec()["mean_condition_dim"] == 3
    assert "mean_condition_dim" not in _model(feature_norm=True, position_mean=True).spec()
    model.fit(_feats(6, 1), TrainConfig(epochs=1, images_per_step=3, patches_per_image=4),
              torch.Generator().manual_seed(0))
    model = model.double().eval()
    x, pos = torch.randn(3, 4, dtype=torch.double), torch.tensor([0, 5, 15])
    mean, std = model.feat_mean_0, model.feat_std_0
    cond = torch.cat([model.pos_0[pos], model.mean_projs[0]((mean[pos] - mean.mean(0)) / std)],
                     dim=-1)
    for i in range(3):

        def to_z(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return model.flows[0]((v[None] - mean[pos[i]]) / std, cond[i : i + 1],
                                  model.warm())[0][0]

        jac = torch.autograd.functional.jacobian(to_z, x[i])
        z = to_z(x[i])
        # the Jacobian of x -> z includes the standardisation's 1 / std
        want = -0.5 * z.pow(2).sum() - 2 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(model.level_log_prob(0, x, pos)[0][i], want)
    with pytest.raises(ValueError, match="position mean"):
        FlowBankModel(CHANNELS, GRIDS, n_couplings=[2, 2], hidden_dims=[8, 8], clamp_alpha=1.9,
                      spectral_norm=False, pos_dim=8, warmup_steps=0, feature_norm=True,
                      mean_condition_dim=3)
