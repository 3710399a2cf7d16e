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
from ccnf.models.ccnf import ccnf_spec


def _model_and_batch(n_classes: int = 3) -> tuple[CCNF, LevelBatch]:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0)
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=n_classes)
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


ALL_ON = LossConfig(lambda_proto=0.1, lambda_mi_feat=0.1, lambda_dsm=0.1, dsm_samples=8)


def test_all_terms_present_and_finite() -> None:
    model, batch = _model_and_batch()
    terms = level_losses(model, 0, batch, torch.arange(3), ALL_ON, torch.Generator())
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


def _grad_into_flow(model: CCNF) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.flows.parameters() if p.grad is not None)


def test_coupled_center_loss_sends_gradient_into_the_flow() -> None:
    """E10 (center_detach false): z and the prototype pull on each other."""
    model, batch = _model_and_batch()
    out = model.forward_level(0, batch.x, batch.y, batch.pos)
    center_loss(model, 0, batch, out.z, detach=False).backward()
    assert _grad_into_flow(model) > 0
    assert model.protos[0].weight.grad.abs().sum() > 0


def test_class_mixture_prior_uses_the_class_centre_in_log_p() -> None:
    """E7: log p(x|y) = log N(z; P e_y, I) + logdet, and the centre gets gradient from L_g."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0,
                     prior="class_mixture")
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=2)
    model.eval()
    x, y, pos = torch.randn(5, 6), torch.tensor([0, 1, 0, 1, 1]), torch.arange(5)
    out = model.forward_level(0, x, y, pos)
    mu = model.prototype(0, y)
    assert out.mu is not None and float(mu.detach().abs().sum()) > 0
    want = -0.5 * (out.z - mu).pow(2).sum(1) - 3 * math.log(2 * math.pi) + out.logdet
    torch.testing.assert_close(out.log_prob, want)
    std_prior = ccnf_spec(cfg.model_copy(update={"prior": "standard"}), [6])
    standard = CCNF([6], [[3, 3]], std_prior, n_classes=2)
    standard.load_state_dict(model.state_dict())
    standard.eval()
    plain = standard.forward_level(0, x, y, pos)
    torch.testing.assert_close(plain.z, out.z)
    assert not torch.allclose(plain.log_prob, out.log_prob)
    (-out.log_prob.mean()).backward()
    assert model.protos[0].weight.grad.abs().sum() > 0


def test_standard_prior_log_p_ignores_the_centre() -> None:
    model, batch = _model_and_batch()
    out = model.forward_level(0, batch.x, batch.y, batch.pos)
    (-out.log_prob.mean()).backward()
    assert model.protos[0].weight.grad is None


def test_position_only_flow_ignores_the_class() -> None:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0,
                     class_conditioning=False)
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=3)
    model.eval()
    x, pos = torch.randn(4, 6), torch.arange(4)
    a = model.forward_level(0, x, torch.zeros(4, dtype=torch.long), pos)
    b = model.forward_level(0, x, torch.full((4,), 2), pos)
    torch.testing.assert_close(a.log_prob, b.log_prob)
    assert model.flows[0].couplings[0].hidden.weight.shape[1] == 3 + 4  # x_a + PE only


def test_feature_norm_is_a_change_of_variables() -> None:
    """E1: x' = (x - m) / s with fixed stats; log p(x) = log p(x') - sum log s."""
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0,
                     feature_norm=True)
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=2)
    model.eval()
    mean, std = torch.randn(6), torch.rand(6) + 0.5
    model.set_feature_stats(0, mean, std)
    x, y, pos = torch.randn(4, 6), torch.tensor([0, 1, 1, 0]), torch.arange(4)
    out = model.forward_level(0, x, y, pos)
    unnormed = ccnf_spec(cfg.model_copy(update={"feature_norm": False}), [6])
    raw = CCNF([6], [[3, 3]], unnormed, n_classes=2)
    raw.load_state_dict(model.state_dict())
    raw.eval()
    ref = raw.forward_level(0, (x - mean) / std, y, pos)
    torch.testing.assert_close(out.z, ref.z)
    torch.testing.assert_close(out.log_prob, ref.log_prob - std.log().sum())


def test_proto_head_is_coupled_to_the_flow() -> None:
    """E4: L_proto's gradient reaches the flow (unlike E11's L_center)."""
    from ccnf.losses import proto_head_loss

    model, batch = _model_and_batch()
    out = model.forward_level(0, batch.x, batch.y, batch.pos)
    loss = proto_head_loss(model, 0, batch, out.z, torch.arange(3), tau=0.1)
    assert float(loss.detach()) > 0
    loss.backward()
    assert _grad_into_flow(model) > 0
    assert "proto" in model.heads


def test_feature_mi_is_infonce_over_seen_classes() -> None:
    from ccnf.losses import feature_mi_loss, image_mean

    model, batch = _model_and_batch()
    z = torch.randn(batch.x.shape[0], 6)
    seen = torch.arange(3)
    got = feature_mi_loss(model, 0, batch, z, seen, tau=0.5)
    v = torch.nn.functional.normalize(model.heads["mi_feat"][0](image_mean(batch, z)), dim=-1)
    e = torch.nn.functional.normalize(model.embedding[seen], dim=-1)
    logits = v @ e.t() / 0.5
    want = -(logits.log_softmax(-1)[torch.arange(4), batch.image_class]).mean()
    torch.testing.assert_close(got, want)


def test_heads_survive_a_checkpoint_round_trip() -> None:
    from ccnf.losses import build_heads

    model, _ = _model_and_batch()
    build_heads(model, LossConfig(lambda_proto=1.0, lambda_mi_feat=1.0))
    ckpt = model.checkpoint()
    back = CCNF.from_checkpoint(ckpt, model.cfg)
    assert set(back.heads) == {"proto", "mi_feat"}
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_building_a_head_does_not_shift_the_global_rng() -> None:
    from ccnf.losses import build_heads

    model, _ = _model_and_batch()
    torch.manual_seed(5)
    build_heads(model, LossConfig(lambda_proto=1.0))
    after = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(torch.rand(3), after)


def test_dsm_loss_is_zero_for_the_exact_score() -> None:
    """P6: for an identity-like flow (z = x, log p = log N(x; 0, I)) and x = 0, the score at
    x~ = sigma eps is -x~ = -sigma eps, so the residual grad + eps / sigma vanishes only for
    sigma = 1; check the formula at sigma = 1 and a positive value elsewhere."""
    from ccnf.losses import dsm_loss

    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=1, hidden_dim=4, embedding_dim=2, pos_dim=4, warmup_steps=0,
                     spectral_norm=False, noise_dim=4)
    model = CCNF([4], [[2, 2]], ccnf_spec(cfg, [4]), n_classes=1)
    for p in model.flows.parameters():
        torch.nn.init.zeros_(p)  # s = t = 0: z = x, logdet = 0
    batch = LevelBatch(
        x=torch.zeros(6, 4), y=torch.zeros(6, dtype=torch.long), pos=torch.arange(6) % 4,
        image=torch.zeros(6, dtype=torch.long), image_class=torch.zeros(1, dtype=torch.long),
    )
    gen = torch.Generator().manual_seed(0)
    assert float(dsm_loss(model, 0, batch, [1.0], 6, gen).detach()) == pytest.approx(0.0, abs=1e-10)
    assert float(dsm_loss(model, 0, batch, [0.5], 6, gen).detach()) > 0


def test_noise_condition_changes_the_density() -> None:
    torch.manual_seed(0)
    cfg = FlowConfig(n_couplings=2, hidden_dim=8, embedding_dim=4, pos_dim=4, warmup_steps=0,
                     noise_dim=4)
    model = CCNF([6], [[3, 3]], ccnf_spec(cfg, [6]), n_classes=1)
    model.eval()
    x, y, pos = torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.arange(4)
    clean = model.forward_level(0, x, y, pos)
    zero = model.forward_level(0, x, y, pos, sigma=torch.zeros(4))
    torch.testing.assert_close(clean.log_prob, zero.log_prob)
    noisy = model.forward_level(0, x, y, pos, sigma=torch.full((4,), 0.2))
    assert not torch.allclose(clean.log_prob, noisy.log_prob)


def test_reg_scale_scales_only_the_regularizers() -> None:
    cfg = LossConfig(lambda_g=1.0, lambda_logdet=1.0, lambda_z=1.0)
    per_level = [{"L_g": torch.tensor(2.0), "L_logdet_reg": torch.tensor(3.0),
                  "L_z_reg": torch.tensor(5.0)}]
    assert float(total_loss(per_level, cfg, reg_scale=0.1)[0]) == pytest.approx(2.0 + 0.8)
    assert float(total_loss(per_level, cfg, reg_scale=0.0)[0]) == pytest.approx(2.0)


def test_one_pass_terms_equal_separate_forwards() -> None:
    """L_mi and L_e from the single concatenated pass equal their direct definitions."""
    from ccnf.losses import class_entropy, entropy_inputs, mi_margin, negative_classes

    model, batch = _model_and_batch()
    model.eval()  # same spectral-norm estimate in every forward
    seen = torch.arange(3)
    cfg = LossConfig(entropy_samples=7, mi_samples=9)
    terms = level_losses(model, 0, batch, seen, cfg, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    pick = torch.randperm(batch.x.shape[0], generator=gen)[:9]
    neg = negative_classes(batch, seen, gen)
    assert bool((neg != batch.y).all())
    pos_out = model.forward_level(0, batch.x[pick], batch.y[pick], batch.pos[pick])
    neg_out = model.forward_level(0, batch.x[pick], neg[pick], batch.pos[pick])
    want_mi = mi_margin(pos_out.log_prob, neg_out.log_prob, 6, cfg.mi_margin)
    x_e, y_e, p_e = entropy_inputs(batch, seen, 7, gen)
    ent = model.forward_level(0, x_e, y_e, p_e)
    want_e = class_entropy(ent.log_prob, 3, 6, cfg.entropy_tau)
    torch.testing.assert_close(terms["L_mi"], want_mi)
    torch.testing.assert_close(terms["L_e"], want_e)
    assert 0 < float(want_e.detach()) <= math.log(3) + 1e-6


@pytest.mark.parametrize("negatives", ["task", "seen"])
def test_task_negatives_never_touch_old_classes(negatives: str) -> None:
    """loss.negatives: task: L_mi's negative and L_e's softmax run over the classes trained
    now, so an old class (no positives in the batch) gets no gradient from either term; the
    note's 'seen' pushes the old classes' density down."""
    model, batch = _model_and_batch(n_classes=5)
    # the batch holds classes 3 and 4 only (the current task); 0..2 are old classes
    batch.image_class = torch.tensor([3, 4, 4, 3])
    batch.y = batch.image_class.repeat_interleave(5)
    seen = torch.arange(5)
    cand = torch.tensor([3, 4]) if negatives == "task" else None
    cfg = LossConfig(lambda_g=0.0, lambda_logdet=0.0, lambda_z=0.0, lambda_balance=0.0,
                     lambda_scale=0.0, lambda_center=0.0, lambda_mi=1.0, lambda_entropy=1.0,
                     mi_margin=50.0)
    terms = level_losses(model, 0, batch, seen, cfg, torch.Generator().manual_seed(0),
                         negatives=cand)
    assert set(terms) == {"L_mi", "L_e"}
    (terms["L_mi"] + terms["L_e"]).backward()
    old = model.embedding.grad[:3].abs().sum(dim=1)
    new = model.embedding.grad[3:].abs().sum(dim=1)
    assert bool((new > 0).all())
    if negatives == "task":
        assert bool((old == 0).all())
    else:
        assert bool((old > 0).any())


def test_replayed_images_of_old_classes_stay_out_of_mi_and_entropy() -> None:
    """negatives: task with replayed or generated images of old classes in the batch: L_mi and
    L_e are evaluated on the current task's vectors only, so the old classes' images (and the
    old classes' rows of the embedding) get no gradient from them."""
    model, batch = _model_and_batch(n_classes=5)
    # images of the task's classes 3 and 4, and replayed images of the old classes 0 and 1
    batch.image_class = torch.tensor([3, 0, 4, 1])
    batch.y = batch.image_class.repeat_interleave(5)
    batch.x.requires_grad_(True)
    cfg = LossConfig(lambda_g=0.0, lambda_logdet=0.0, lambda_z=0.0, lambda_balance=0.0,
                     lambda_scale=0.0, lambda_center=0.0, lambda_mi=1.0, lambda_entropy=1.0,
                     mi_margin=50.0, mi_samples=6, entropy_samples=6)
    terms = level_losses(model, 0, batch, torch.arange(5), cfg, torch.Generator().manual_seed(0),
                         negatives=torch.tensor([3, 4]))
    assert set(terms) == {"L_mi", "L_e"}
    (terms["L_mi"] + terms["L_e"]).backward()
    old_rows = torch.isin(batch.y, torch.tensor([0, 1]))
    assert float(batch.x.grad[old_rows].abs().sum()) == 0.0
    assert float(batch.x.grad[~old_rows].abs().sum()) > 0.0
    assert float(model.embedding.grad[:3].abs().sum()) == 0.0
    # a batch of old classes' images alone: nothing to evaluate them on
    batch.image_class = torch.tensor([0, 1, 1, 0])
    batch.y = batch.image_class.repeat_interleave(5)
    terms = level_losses(model, 0, batch, torch.arange(5), cfg, torch.Generator(),
                         negatives=torch.tensor([3, 4]))
    assert "L_mi" not in terms and "L_e" not in terms


def test_one_candidate_class_switches_mi_and_entropy_off() -> None:
    model, batch = _model_and_batch(n_classes=3)
    batch.image_class = torch.full((4,), 2)
    batch.y = batch.image_class.repeat_interleave(5)
    terms = level_losses(model, 0, batch, torch.arange(3), LossConfig(), torch.Generator(),
                         negatives=torch.tensor([2]))
    assert "L_mi" not in terms and "L_e" not in terms
