from __future__ import annotations

import math

import pytest
import torch

from ccnf.config import FlowConfig, LossConfig
from ccnf.flows import CCNF
from ccnf.losses import (
    TERMS,
    LevelBatch,
    balance,
    center_loss,
    level_losses,
    total_loss,
    z_moment_reg,
)


def _model_and_batch(n_classes: int = 3) -> tuple[CCNF, LevelBatch]:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0)
    model = CCNF([6], [[3, 3]], cfg, n_classes=n_classes)
    b, k = 4, 5
    image_class = torch.tensor([0, 1, 2, 1])[:b] % n_classes
    batch = LevelBatch(
        x=torch.randn(b * k, 6),
        y=image_class.repeat_interleave(k),
        pos=torch.randint(0, 9, (b * k,)),
        image=torch.arange(b).repeat_interleave(k),
        image_class=image_class,
    )
    return model, batch


def test_all_terms_present_and_finite() -> None:
    model, batch = _model_and_batch()
    terms = level_losses(model, 0, batch, torch.arange(3), LossConfig(), torch.Generator())
    assert set(terms) == set(TERMS)
    assert all(torch.isfinite(v) for v in terms.values())


def test_zero_weight_disables_term() -> None:
    model, batch = _model_and_batch()
    cfg = LossConfig(lambda_mi=0.0, lambda_entropy=0.0, lambda_center=0.0)
    terms = level_losses(model, 0, batch, torch.arange(3), cfg, torch.Generator())
    assert not {"L_mi", "L_e", "L_center"} & set(terms)


def test_single_seen_class_has_no_discriminative_terms() -> None:
    model, batch = _model_and_batch(n_classes=1)
    terms = level_losses(model, 0, batch, torch.arange(1), LossConfig(), torch.Generator())
    assert "L_mi" not in terms and "L_e" not in terms


def test_nll_term_is_negative_log_density_per_dim() -> None:
    model, batch = _model_and_batch()
    model.eval()  # no power iteration between the two forwards
    out = model.forward_level(0, batch.x, batch.y, batch.pos)
    want = (0.5 * out.z.pow(2).sum(1) + 3 * math.log(2 * math.pi) - out.logdet) / 6
    terms = level_losses(model, 0, batch, torch.arange(3), LossConfig(), torch.Generator())
    torch.testing.assert_close(terms["L_g"], want.mean())


def test_regularizer_formulas() -> None:
    z = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    # mean = (2, 0), var = (1, 4): ((4 + 0) + (0 + 9)) / 2
    assert float(z_moment_reg(z)) == pytest.approx(6.5)
    # 0.5 * ||z||^2 / D = (1.25, 3.25) -> mean 2.25 -> (2.25 - 0.5)^2
    assert float(balance(z)) == pytest.approx(1.75**2)


def test_center_loss_sends_no_gradient_into_the_flow() -> None:
    """E11: only the class embedding and the prototype projection learn from L_center."""
    model, batch = _model_and_batch()
    out = model.forward_level(0, batch.x, batch.y, batch.pos)
    center_loss(model, 0, batch, out.z).backward()
    for name, p in model.flows.named_parameters():
        assert p.grad is None or torch.all(p.grad == 0), name
    assert model.protos[0].weight.grad is not None and model.protos[0].weight.grad.abs().sum() > 0
    assert model.embedding.grad is not None and model.embedding.grad.abs().sum() > 0


def test_center_loss_value_matches_direct_formula() -> None:
    model, batch = _model_and_batch()
    z = torch.randn(batch.x.shape[0], 6)
    zbar = z.view(4, 5, 6).mean(1)
    mu = model.prototype(0, batch.image_class)
    want = (zbar - mu).pow(2).sum(1).mean() / 6
    torch.testing.assert_close(center_loss(model, 0, batch, z), want)


def test_total_loss_weights_and_level_average() -> None:
    cfg = LossConfig(lambda_g=2.0, lambda_center=0.5)
    per_level = [
        {"L_g": torch.tensor(1.0), "L_center": torch.tensor(4.0)},
        {"L_g": torch.tensor(3.0), "L_center": torch.tensor(0.0)},
    ]
    total, means = total_loss(per_level, cfg)
    assert float(means["L_g"]) == 2.0 and float(means["L_center"]) == 2.0
    assert float(total) == pytest.approx(2.0 * 2.0 + 0.5 * 2.0)
