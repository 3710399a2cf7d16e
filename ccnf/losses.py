"""CCNF training losses, one function per term (weights in ``loss.*``; weight 0 skips a term).

Notation for one level with N patch vectors of dimension D from B images:
log p = log p(x|y) (N,), z (N, D), logdet (N,), s the couplings' log-scales.

    L_g            = mean(-log p / D)
    L_logdet_reg   = mean((logdet / D)^2)
    L_z_reg        = mean_d( mean_n(z_nd)^2 + (var_n(z_nd) - 1)^2 )      moment match to N(0, I)
    L_balance      = (mean_n(0.5 ||z_n||^2 / D) - 0.5)^2
    L_scale_penalty= mean(s^2)
    L_mi           = mean(relu(m - (log p(x|y) - log p(x|y_neg)) / D)),  y_neg != y drawn from
                     the candidate classes, on a random subset of ``loss.mi_samples`` vectors
    L_e            = mean_n H(softmax_c(log p(x_n|c) / (D tau))),  c over the candidate
                     classes, on a random subset of ``loss.entropy_samples`` vectors
    Candidates (``loss.negatives``): the classes whose data the task trains on (task) or
    every class seen so far (seen, the note's); with fewer than 2, L_mi and L_e are off.
    L_center       = mean_b ||stopgrad(zbar_b) - P e_{y_b}||^2 / D,  zbar_b = mean of z over
                     image b's sampled positions; only the embedding and P get gradients (E11);
                     with ``loss.center_detach: false`` zbar keeps its gradient (E10)
    L_proto        = mean_b CE(softmax_c(<q_b, k_c> / tau_p), y_b),  q_b = norm(W_q zbar_b),
                     k_c = norm(W_k e_c), c over seen classes; coupled: gradients reach the flow
                     through zbar (E4)
    L_mi_feat      = mean_b -log softmax_c(<v_b, norm(e_c)> / tau_f)[y_b],  v_b = norm(W_f zbar_b):
                     InfoNCE between the image-level latent feature and the class embeddings,
                     negatives = the other seen classes (E5)
    L_dsm          = mean_n sigma_n^2 ||grad_x~ log p(x~_n|y, sigma_n) + eps_n / sigma_n||^2 / D,
                     x~ = x + sigma eps, sigma drawn from ``loss.noise_sigmas``, on a random
                     subset of ``loss.dsm_samples`` vectors (P6, denoising score matching)

With ``flow.prior: class_mixture`` the regularizers L_z_reg and L_balance see z - mu_y (the
latent the prior calls N(0, I)). The regularizers (L_logdet_reg, L_z_reg, L_balance,
L_scale_penalty) can be scaled as a group (task 0's ``train.first_task_reg_scale``, E2/E3) or
switched off after ``train.sub_epochs`` (E3) through ``total_loss(..., reg_scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ccnf.config import LossConfig
from ccnf.flows.ccnf import CCNF, LevelOutput
from ccnf.flows.gaussian import half_sq_norm

TERMS = (
    "L_g",
    "L_logdet_reg",
    "L_z_reg",
    "L_balance",
    "L_scale_penalty",
    "L_mi",
    "L_e",
    "L_center",
    "L_proto",
    "L_mi_feat",
    "L_dsm",
)
REGULARIZERS = ("L_logdet_reg", "L_z_reg", "L_balance", "L_scale_penalty")
# terms only a strategy computes (train.strategy generative_replay): logged only when present
REPLAY_TERMS = ("L_distill",)


def weights(cfg: LossConfig) -> dict[str, float]:
    """Weight of each term in :data:`TERMS` and :data:`REPLAY_TERMS`."""
    return {
        "L_g": cfg.lambda_g,
        "L_logdet_reg": cfg.lambda_logdet,
        "L_z_reg": cfg.lambda_z,
        "L_balance": cfg.lambda_balance,
        "L_scale_penalty": cfg.lambda_scale,
        "L_mi": cfg.lambda_mi,
        "L_e": cfg.lambda_entropy,
        "L_center": cfg.lambda_center,
        "L_proto": cfg.lambda_proto,
        "L_mi_feat": cfg.lambda_mi_feat,
        "L_dsm": cfg.lambda_dsm,
        "L_distill": cfg.lambda_distill,
    }


@dataclass
class LevelBatch:
    """One level's training batch: B images x K sampled positions (N = B * K vectors).

    x: (N, D) features; y: (N,) class ids; pos: (N,) flat grid positions; image: (N,) index of
    the vector's image in 0..B-1; image_class: (B,) class id per image; target: (N, T) what
    L_distill matches on generated vectors (T = 1: the previous model's log p; T = D: the
    latent they were generated from; NaN rows for real ones), or None.
    """

    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor
    image: torch.Tensor
    image_class: torch.Tensor
    target: torch.Tensor | None = None


def nll(out: LevelOutput, dim: int) -> torch.Tensor:
    return (-out.log_prob / dim).mean()


def logdet_reg(out: LevelOutput, dim: int) -> torch.Tensor:
    return (out.logdet / dim).pow(2).mean()


def z_moment_reg(z: torch.Tensor) -> torch.Tensor:
    return (z.mean(dim=0).pow(2) + (z.var(dim=0, unbiased=False) - 1).pow(2)).mean()


def balance(z: torch.Tensor) -> torch.Tensor:
    return ((half_sq_norm(z) / z.shape[1]).mean() - 0.5).pow(2)


def negative_classes(
    batch: LevelBatch, candidates: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """(N,) a random other candidate class per image, repeated over the image's vectors (L_mi).

    candidates: sorted (C,) class ids, C >= 2. An image whose class is not a candidate gets
    an arbitrary candidate; :func:`level_losses` never evaluates its vectors.
    """
    n_cand = candidates.numel()
    slot = torch.searchsorted(candidates, batch.image_class)
    offset = torch.randint(1, n_cand, (slot.numel(),), generator=gen).to(slot.device)
    return candidates[(slot + offset) % n_cand][batch.image]


def mi_margin(
    log_prob: torch.Tensor, neg_log_prob: torch.Tensor, dim: int, margin: float
) -> torch.Tensor:
    """Hinge on the per-dimension log-likelihood gap to the negative class: (N,), (N,) -> ()."""
    return F.relu(margin - (log_prob - neg_log_prob) / dim).mean()


def random_rows(
    pool: torch.Tensor | None, n: int, samples: int, gen: torch.Generator
) -> torch.Tensor:
    """A random subset of at most ``samples`` row indices of a batch of ``n``: of all rows, or
    of ``pool`` (indices, on the batch's device) when given."""
    if pool is None:
        return torch.randperm(n, generator=gen)[: min(samples, n)]
    return pool[torch.randperm(pool.numel(), generator=gen)[: min(samples, pool.numel())]
                .to(pool.device)]


def entropy_inputs(
    batch: LevelBatch, candidates: torch.Tensor, samples: int, gen: torch.Generator,
    pool: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random subset of M vectors (of the rows in ``pool`` when given), each paired with
    every one of the C candidate classes.

    Returns x (C*M, D), y (C*M,), pos (C*M,), class-major (row c*M + i is vector i, class c).
    """
    n = batch.x.shape[0]
    pick = random_rows(pool, n, samples, gen).to(batch.x.device)
    x, pos = batch.x[pick], batch.pos[pick]
    c, m = candidates.numel(), x.shape[0]
    return x.repeat(c, 1), candidates.repeat_interleave(m), pos.repeat(c)


def class_entropy(log_prob: torch.Tensor, n_classes: int, dim: int, tau: float) -> torch.Tensor:
    """Mean entropy of softmax_c(log p(x|c) / (D tau)); log_prob (C*M,) class-major -> ()."""
    logits = (log_prob / (dim * tau)).view(n_classes, -1).t()  # (M, C)
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def image_mean(batch: LevelBatch, z: torch.Tensor) -> torch.Tensor:
    """zbar: (B, D) mean of z (N, D) over each image's sampled positions."""
    n_img = batch.image_class.numel()
    zbar = torch.zeros(n_img, z.shape[1], dtype=z.dtype, device=z.device)
    zbar = zbar.index_add(0, batch.image, z)
    counts = torch.bincount(batch.image, minlength=n_img).clamp_min(1).to(z.dtype)
    return zbar / counts[:, None]


def center_loss(
    model: CCNF, level: int, batch: LevelBatch, z: torch.Tensor, detach: bool = True
) -> torch.Tensor:
    """||zbar - P e_y||^2 / D per image; ``detach`` stops the gradient into the flow (E11)."""
    zbar = image_mean(batch, z.detach() if detach else z)
    mu = model.prototype(level, batch.image_class)
    return (zbar - mu).pow(2).sum(dim=-1).mean() / z.shape[1]


def _linear_stack(shapes: list[tuple[int, int]]) -> nn.Module:
    """Bias-free linear layers, W (out, in), init 0.1 * I (the note's E4 choice)."""
    layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(0.1 * torch.eye(*layer.weight.shape))
    return layers


def _proto_head(model: CCNF) -> nn.Module:
    """E4's heads: W_q per level (E x D_l), then W_k (E x E); created on first use."""
    emb = model.embedding.shape[1]
    return model.head(
        "proto", lambda: _linear_stack([(emb, d) for d in model.channels] + [(emb, emb)])
    )


def _mi_feat_head(model: CCNF) -> nn.Module:
    """E5's projection W_f per level (E x D_l); created on first use."""
    emb = model.embedding.shape[1]
    return model.head("mi_feat", lambda: _linear_stack([(emb, d) for d in model.channels]))


def _class_cross_entropy(
    query: torch.Tensor, keys: torch.Tensor, batch: LevelBatch, seen: torch.Tensor, tau: float
) -> torch.Tensor:
    """CE of softmax_c(<norm(q_b), norm(k_c)> / tau) against each image's class among seen.

    query (B, E) per image, keys (C, E) per seen class.
    """
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).t() / tau
    return F.cross_entropy(logits, torch.searchsorted(seen, batch.image_class))


def proto_head_loss(
    model: CCNF, level: int, batch: LevelBatch, z: torch.Tensor, seen: torch.Tensor, tau: float
) -> torch.Tensor:
    """E4 coupled prototype head: CE of softmax(<norm(W_q zbar), norm(W_k e_c)> / tau)."""
    head = _proto_head(model)
    return _class_cross_entropy(
        head[level](image_mean(batch, z)), head[-1](model.embedding[seen]), batch, seen, tau
    )


def feature_mi_loss(
    model: CCNF, level: int, batch: LevelBatch, z: torch.Tensor, seen: torch.Tensor, tau: float
) -> torch.Tensor:
    """E5 InfoNCE between v = norm(W_f zbar) and the seen class embeddings norm(e_c)."""
    head = _mi_feat_head(model)
    return _class_cross_entropy(
        head[level](image_mean(batch, z)), model.embedding[seen], batch, seen, tau
    )


def build_heads(model: CCNF, cfg: LossConfig) -> None:
    """Create the heads of the enabled head losses now, so the optimizer sees them."""
    if cfg.lambda_proto > 0:
        _proto_head(model)
    if cfg.lambda_mi_feat > 0:
        _mi_feat_head(model)


def dsm_loss(
    model: CCNF,
    level: int,
    batch: LevelBatch,
    sigmas: list[float],
    samples: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """P6 denoising score matching on a random subset of the batch's vectors.

    With x~ = x + sigma eps the score of the noised density at x~ should be -eps / sigma;
    the sigma^2 weight makes every noise level contribute on the same scale.
    """
    n, d = batch.x.shape
    pick = torch.randperm(n, generator=gen)[: min(samples, n)].to(batch.x.device)
    x, y, pos = batch.x[pick], batch.y[pick], batch.pos[pick]
    levels = torch.tensor(sigmas, dtype=x.dtype)
    sigma = levels[torch.randint(len(sigmas), (x.shape[0],), generator=gen)].to(x.device)
    eps = torch.randn(x.shape, generator=gen).to(x.device)
    noisy = (x + sigma[:, None] * eps).requires_grad_(True)
    log_prob = model.forward_level(level, noisy, y, pos, sigma=sigma).log_prob
    (score,) = torch.autograd.grad(log_prob.sum(), noisy, create_graph=True)
    residual = score + eps / sigma[:, None]
    return (sigma.pow(2) * residual.pow(2).sum(dim=-1)).mean() / d


def level_losses(
    model: CCNF,
    level: int,
    batch: LevelBatch,
    seen: torch.Tensor,
    cfg: LossConfig,
    gen: torch.Generator,
    *,
    negatives: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every enabled term for one level. seen: sorted (C,) ids of all classes seen so far
    (L_proto, L_mi_feat); negatives: sorted ids of L_mi's and L_e's candidate classes
    (``loss.negatives``; None: seen). L_mi and L_e are evaluated on the batch's vectors of
    candidate classes only: replayed or generated images of a class that is not a candidate
    are never paired with the candidates (the classes ``negatives: task`` protects).

    The batch, L_mi's negative-class copy and L_e's class-paired subset go through the flow
    in one pass: one set of (spectral-normalized) weights per step and a few large matrix
    products instead of three rounds of small ones.
    """
    w = weights(cfg)
    n, dim = batch.x.shape
    cand = seen if negatives is None else negatives
    xs, ys, ps = [batch.x], [batch.y], [batch.pos]
    use_mi = cand.numel() >= 2 and w["L_mi"] > 0
    use_e = cand.numel() >= 2 and w["L_e"] > 0
    pool = None  # rows of candidate classes, when not every row is one
    if use_mi or use_e:
        in_cand = torch.isin(batch.y, cand)
        if not bool(in_cand.all()):
            pool = in_cand.nonzero()[:, 0]
            if pool.numel() == 0:  # only replayed or generated images: nothing to pair
                use_mi = use_e = False
    mi_pick = None
    if use_mi:
        mi_pick = random_rows(pool, n, cfg.mi_samples, gen).to(batch.x.device)
        xs.append(batch.x[mi_pick])
        ys.append(negative_classes(batch, cand, gen)[mi_pick])
        ps.append(batch.pos[mi_pick])
    if use_e:
        x_e, y_e, p_e = entropy_inputs(batch, cand, cfg.entropy_samples, gen, pool)
        xs.append(x_e)
        ys.append(y_e)
        ps.append(p_e)
    joint = model.forward_level(level, torch.cat(xs), torch.cat(ys), torch.cat(ps))
    out = LevelOutput(
        z=joint.z[:n],
        logdet=joint.logdet[:n],
        scale_sq=joint.scale_sq[:n],
        log_prob=joint.log_prob[:n],
        mu=None if joint.mu is None else joint.mu[:n],
    )
    terms: dict[str, torch.Tensor] = {}
    if w["L_g"] > 0:
        terms["L_g"] = nll(out, dim)
    if w["L_logdet_reg"] > 0:
        terms["L_logdet_reg"] = logdet_reg(out, dim)
    if w["L_z_reg"] > 0:
        terms["L_z_reg"] = z_moment_reg(out.z_centered)
    if w["L_balance"] > 0:
        terms["L_balance"] = balance(out.z_centered)
    if w["L_scale_penalty"] > 0:
        terms["L_scale_penalty"] = out.scale_sq.mean()
    n_mi = 0 if mi_pick is None else mi_pick.numel()
    if mi_pick is not None:
        terms["L_mi"] = mi_margin(
            out.log_prob[mi_pick], joint.log_prob[n : n + n_mi], dim, cfg.mi_margin
        )
    if use_e:
        start = n + n_mi
        terms["L_e"] = class_entropy(
            joint.log_prob[start:], cand.numel(), dim, cfg.entropy_tau
        )
    if seen.numel() >= 2:
        if w["L_proto"] > 0:
            terms["L_proto"] = proto_head_loss(model, level, batch, out.z, seen, cfg.proto_tau)
        if w["L_mi_feat"] > 0:
            terms["L_mi_feat"] = feature_mi_loss(
                model, level, batch, out.z, seen, cfg.mi_feat_tau
            )
    if w["L_center"] > 0:
        terms["L_center"] = center_loss(model, level, batch, out.z, detach=cfg.center_detach)
    if w["L_dsm"] > 0:
        terms["L_dsm"] = dsm_loss(model, level, batch, cfg.noise_sigmas, cfg.dsm_samples, gen)
    if w["L_distill"] > 0 and batch.target is not None:
        terms["L_distill"] = distill_loss(out, batch.target, dim)
    return terms


def distill_loss(out: LevelOutput, target: torch.Tensor, dim: int) -> torch.Tensor:
    """L_distill on the generated vectors x~ of a batch (rows of ``target`` that are finite;
    0 if the batch holds none), by the target's width T:

    T = 1 (``loss.distill_target: log_prob``): mean ((log p(x~|y) - log p_old(x~|y)) / D)^2;
    T = D (``latent``): mean ||f(x~; y) - z||^2 / D, z the latent x~ was generated from, so
    the new map is held to the old one on the earlier classes' samples, not only their
    density values.

    out: the level's output on the batch's N vectors; target: (N, T).
    """
    mask = torch.isfinite(target).all(dim=-1)
    if not bool(mask.any()):
        return out.log_prob.new_zeros(())
    if target.shape[-1] == 1:
        return ((out.log_prob[mask] - target[mask, 0]) / dim).pow(2).mean()
    return (out.z[mask] - target[mask]).pow(2).sum(dim=-1).mean() / dim


def total_loss(
    per_level: list[dict[str, torch.Tensor]], cfg: LossConfig, reg_scale: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Average each term over levels, weight and sum. Returns (total, {term: level mean}).

    reg_scale multiplies the weights of :data:`REGULARIZERS` (0 switches them off).
    """
    w = weights(cfg)
    for name in REGULARIZERS:
        w[name] *= reg_scale
    names = [t for t in (*TERMS, *REPLAY_TERMS) if t in per_level[0]]
    means = {t: torch.stack([lv[t] for lv in per_level]).mean() for t in names}
    total = sum((w[t] * means[t] for t in names), torch.zeros(()))
    return total, means
