"""The trainer's typed config: student, heads, losses, data, optimizer and run (TOML sections mirror it).

``model.preset`` names a whole recipe (``tiny``, ``demo``, ``amoe-dense``, ``amoe``, ``m2ot-b``,
``tgr-ti``, ``tgr-s``, ``tgr-b``): the student and its router, and, where the paper states them, the
heads, loss weights and optimizer. The preset fills those fields first and any field given next to it
wins, so an ablation is one line. Where each value comes from: the README's "Defaults vs the papers"
table, which ``tests/train/test_paper_defaults.py`` holds against these presets.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from config import StrictConfig, load_config

__all__ = ["DataConfig", "GuideConfig", "HeadConfig", "LossConfig", "ModelConfig", "MoEConfig", "OptimConfig", "PRESETS",
           "RunConfig", "StoreSource", "TrainConfig", "preset", "with_stores"]


class GuideConfig(StrictConfig):
    """TGR-MoE's teacher-guided routing (supplement Eq. S1–S3, Table S1), on when ``model.moe.guide = "tgr"``.

    A teacher router per guided MoE block reads the cached features of a teacher layer for the same
    tokens (``cache-teachers --layers``); every field has a default that works on any store with
    cached layers. Reconstructions: ``train/moe/tgr.py``."""

    teacher: str | None = Field(None, description="teacher whose cached layers the teacher routers read "
                                "(default: the first of the run's teachers with cached layers)")
    layers: dict[int, int] | None = Field(None, min_length=1, description="student MoE block (0-based, as moe.layers) -> cached "
                                          "teacher layer (1-based, as --layers); default: the MoE blocks spread "
                                          "evenly over the cached layers, in order (Table S1: {8,10,12} -> {8,10,12})")
    routes: Literal["student", "teacher"] = Field(
        "student", description="who routes in training: student (TGR-MoE) or teacher (the upper bound of §5.3: the "
        "student router learns only by distillation and routes at inference)")
    distill: float = Field(5.0, ge=0, allow_inf_nan=False, description="λ_distill on Σ_layers KL(teacher ‖ student) "
                           "per token (Eq. S2)")
    load_balance: float = Field(0.005, ge=0, allow_inf_nan=False, description="λ_load on the teacher routers' load "
                                "balancing, summed over layers (Eq. S1)")
    entropy: float = Field(0.005, ge=0, allow_inf_nan=False, description="λ_ent on the teacher routers' mean "
                           "normalized token entropy (minimized: confident teacher routing)")
    noise_std: float = Field(1.0, ge=0, allow_inf_nan=False, description="Gaussian noise on the teacher router's "
                             "logits in training (Table S1: 1.0)")


class MoEConfig(StrictConfig):
    """Which blocks get a sparse MLP and how it routes (M²oT §4, AMoE §3.1, TGR-MoE)."""

    layers: Literal["none", "all", "odd", "even"] | list[int] = Field(
        "none", description="blocks with an MoE MLP: none (dense), all (AMoE), odd (M²oT: every other), or indices")
    kind: Literal["topk", "soft", "expert_choice"] = "topk"
    experts: int = Field(8, gt=0)
    top_k: int = Field(2, gt=0)
    hidden: int | None = Field(None, gt=0, description="expert hidden width (default: the dense MLP's)")
    fine_grained: bool = Field(False, description="shrink the expert width by top_k so active params match dense (M²oT §5.1)")
    backend: Literal["auto", "triton", "torch", "loop"] = "auto"
    # router (defaults: M²oT Eq. 5 and 9-10; each named preset sets its paper's values)
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="M²oT Eq. 5: TOP_k(softmax(r(x)))")
    renormalize: bool = Field(False, description="rescale the k gates to sum 1 (M²oT Eq. 5 does not)")
    noise_std: float = Field(0.0, ge=0, description="Gaussian noise on the logits in training (TGR-MoE: 1.0)")
    load_balance_weight: float = Field(0.01, ge=0, description="λ on M·Σ F_j P_j (M²oT Eq. 9), summed over MoE "
                                       "layers (TGR-MoE Eq. S1)")
    z_loss_weight: float = Field(0.0, ge=0, description="router z-loss (ST-MoE); TGR-MoE uses 1e-3 only in a comparison")
    capacity_factor: float = Field(1.0, gt=0, description="expert choice: capacity = tokens·k/E · factor")
    soft_slots: int = Field(1, gt=0, description="Soft MoE: slots per expert")
    upcycle_from: str | None = Field(None, description="dense run directory or checkpoint to upcycle (M²oT §4.1)")
    upcycle_noise: float = Field(0.0, ge=0, description="noise std (relative) added to each expert copy")
    bias: bool = True
    guide: Literal["none", "tgr"] = Field("none", description="tgr: TGR-MoE's teacher routers on cached teacher "
                                          "layers supervise the student's routers (settings: model.moe.tgr)")
    tgr: GuideConfig = GuideConfig()


class ModelConfig(StrictConfig):
    """The student ViT: patch embedding, CLS + registers, pre-norm blocks with 2-D normalized RoPE."""

    preset: str | None = Field(None, description="named recipe: tiny, demo, amoe-dense, amoe, m2ot-b, tgr-ti, tgr-s, tgr-b")
    init_from: str | None = Field(None, description="run directory whose latest weights (student, heads, routers, "
                                  "target spaces) start this run with a new optimizer: AMoE's stage 2 from stage 1")
    patch_size: int = Field(16, gt=0)
    dim: int = Field(192, gt=0)
    depth: int = Field(4, gt=0)
    num_heads: int = Field(3, gt=0)
    head_dim: int | None = Field(None, gt=0, description="attention head width (default dim / heads)")
    mlp_ratio: float = Field(4.0, gt=0)
    mlp_hidden: int | None = Field(None, gt=0, description="dense MLP hidden width (default dim · mlp_ratio)")
    activation: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    qkv_bias: bool = True
    registers: int = Field(4, ge=0)
    rope_base: float = Field(100.0, gt=1)
    rope_coords: Literal["normalized", "patches"] = Field(
        "normalized", description="RoPE positions: normalized to [-1, 1] per image (AMoE suppl. §8, resolution-free) or "
        "patches from the centre / (rope_ref_grid/2) (ablation: positions grow with the grid)")
    rope_ref_grid: int = Field(16, gt=0, description="the grid side that spans [-1, 1] when rope_coords = patches")
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    moe: MoEConfig = MoEConfig()

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """The preset's student fields first, then the fields given (the other sections: ``TrainConfig``)."""
        if isinstance(data, dict) and data.get("preset") is not None:
            return _merge(preset(data["preset"]).get("model", {}), data)
        return data

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or int(round(self.dim * self.mlp_ratio))

    def moe_layer_ids(self) -> list[int]:
        spec = self.moe.layers
        if spec == "none":
            return []
        if spec == "all":
            return list(range(self.depth))
        if spec in ("odd", "even"):  # 0-based block index: "odd" = blocks 1, 3, 5, ... (every other layer)
            return [i for i in range(self.depth) if i % 2 == (1 if spec == "odd" else 0)]
        bad = [i for i in spec if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"moe.layers {bad} outside [0, {self.depth})")
        return sorted(set(spec))


def _merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``base``, nested dicts merged key by key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


_AMOE_BACKBONE = dict(dim=768, depth=18, num_heads=8, head_dim=128, norm="rmsnorm", qk_norm=True, registers=4)
# AMoE §3.1 "the same projection heads for the patch features and the global image representation";
# supplement §7: "a linear decay schedule ... after a 500-step warmup" (the other numbers were lost in
# the text we have)
_AMOE_RECIPE = dict(heads=dict(share=True), optim=dict(schedule="linear", warmup_steps=500))


def _tgr(dim: int, heads: int) -> dict[str, dict[str, Any]]:
    """TGR-MoE Table S1: a DeiT of width ``dim``, 12 blocks, MoE on blocks {8, 10, 12} (1-based), V-MoE routing
    (8 experts, top-2; supplement §A and C.3), noise 1.0, load balancing 0.005 summed over layers, no z-loss;
    teacher-guided routing on (``model.moe.tgr``'s defaults are Table S1's; the V-MoE baseline is
    ``model.moe.guide = "none"``); AdamW lr 5e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.05,
    cosine, 5 warmup epochs."""
    return dict(
        model=dict(dim=dim, depth=12, num_heads=heads, mlp_ratio=4.0, registers=4,
                   moe=dict(layers=[7, 9, 11], experts=8, top_k=2, score="softmax", renormalize=False,
                            noise_std=1.0, load_balance_weight=0.005, z_loss_weight=0.0, guide="tgr")),
        optim=dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, schedule="cosine",
                   warmup_steps=6255),  # 5 epochs of ImageNet-1K at DeiT's batch of 1,024 (not stated)
    )


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # small students for tests and the CPU demo
    "tiny": dict(model=dict(dim=64, depth=2, num_heads=2, registers=4)),
    "demo": dict(model=dict(dim=192, depth=4, num_heads=3, registers=4)),
    # AMoE as released: 18 blocks, dim 768, 8 heads of width 128, RMSNorm, QK-norm; dense MLP 4x
    "amoe-dense": dict(model=dict(_AMOE_BACKBONE), **_AMOE_RECIPE),
    # AMoE: every block sparse, 28 gated experts of width 384, top-6, no shared expert; the public
    # release (tiiuae/siglino, MoEArgs defaults) gates with sigmoid scores, not renormalized
    "amoe": dict(model=dict(_AMOE_BACKBONE, activation="swiglu",
                            moe=dict(layers="all", experts=28, top_k=6, hidden=384, bias=False, score="sigmoid",
                                     renormalize=False, noise_std=0.0, load_balance_weight=0.01,
                                     z_loss_weight=0.0)),
                 **_AMOE_RECIPE),
    # M²oT-B: ViT-B/16, 8 experts top-2 on every other block, fine-grained (hidden 3072 / k) so the
    # active parameters stay those of ViT-B (M²oT §5.1: 86M active, 170M total); Eq. 5 gates without
    # renormalizing, λ2 = 0.01; two projectors per teacher (§3.1), cos + smooth-L1 at equal weight
    # (Eq. 2); Table 5: lr 2e-4, cosine, clip 1.0, 10 warmup epochs of 200
    "m2ot-b": dict(model=dict(dim=768, depth=12, num_heads=12, registers=4,
                              moe=dict(layers="odd", experts=8, top_k=2, fine_grained=True, score="softmax",
                                       renormalize=False, noise_std=0.0, load_balance_weight=0.01,
                                       z_loss_weight=0.0)),
                   heads=dict(share=False),
                   loss=dict(summary_cos=1.0, summary_smooth_l1=1.0, patches_cos=1.0, patches_smooth_l1=1.0,
                             tas=0.5),  # Eq. 10: L_dist + λ1·L_tas + λ2·L_lb, λ1 = 0.5
                   optim=dict(lr=2e-4, schedule="cosine", clip_grad=1.0,
                              warmup_steps=12511)),  # 10 epochs of ImageNet-1K at the batch of 1,024
    # TGR-MoE (supplement Table S1), the three DeiT widths
    "tgr-ti": _tgr(192, 3),
    "tgr-s": _tgr(384, 6),
    "tgr-b": _tgr(768, 12),
}


class HeadConfig(StrictConfig):
    """Per-teacher adaptor heads (AMoE §3.1: Linear, LayerNorm, GELU, Linear)."""

    hidden: int | None = Field(None, gt=0, description="head hidden width (default: the student dim)")
    share: bool = Field(False, description="one head per teacher for summary, patches and registers (AMoE) "
                                           "instead of one per feature (RADIO)")


class LossConfig(StrictConfig):
    """Weights of each term: w_cos·(1 − cos) + w_sl1·smooth-L1 per feature (M²oT Eq. 2, AM-RADIO weights)."""

    summary_cos: float = Field(1.0, ge=0)
    summary_smooth_l1: float = Field(0.0, ge=0)
    patches_cos: float = Field(0.9, ge=0)
    patches_smooth_l1: float = Field(0.1, ge=0)
    registers_cos: float = Field(0.9, ge=0)
    registers_smooth_l1: float = Field(0.1, ge=0)
    smooth_l1_beta: float = Field(1.0, gt=0)
    teacher_weights: dict[str, float] = Field(default_factory=dict, description="per-teacher multiplier (default 1)")
    phis: bool = Field(True, description="match summary and patches in PHI-S space where the store has statistics")
    router: float = Field(1.0, ge=0, description="multiplier on the MoE layers' router losses (summed over layers)")
    tas: float = Field(0.0, ge=0, allow_inf_nan=False, description="λ1 of M²oT's Teacher-Aware Specialization loss "
                       "(Eq. 8, 10; the paper: 0.5), summed over the token-choice MoE layers; 0 = off")
    arkd: float | dict[str, float] = Field(0.0, description="ARKD weight (AMoE Eq. 7) in each teacher's objective: "
                                           "one number for every teacher or {teacher = weight}; 0 = off")

    @model_validator(mode="after")
    def _check_arkd(self) -> "LossConfig":
        values = self.arkd.values() if isinstance(self.arkd, dict) else [self.arkd]
        if any(not (v >= 0) or v == float("inf") for v in values):
            raise ValueError(f"loss.arkd must be finite and >= 0, got {self.arkd}")
        return self

    def arkd_weight(self, teacher: str) -> float:
        return self.arkd.get(teacher, 0.0) if isinstance(self.arkd, dict) else self.arkd


class StoreSource(StrictConfig):
    """One store a run reads, and its share of the images (a ``[[data.stores]]`` table)."""

    url: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="relative share of the images drawn")


class DataConfig(StrictConfig):
    stores: list[StoreSource] = Field(default_factory=list, description="stores read, mixed by weight (AMoE §3.4 "
                                      "stage 2: high-resolution pool + stage-1 data); `pipeline train --store` fills "
                                      "the URLs. All must hold the same teachers (fingerprints equal but for the "
                                      "image policy)")
    teachers: list[str] | None = Field(None, description="teachers to distil (default: all in the first store)")
    mode: Literal["packed", "padded"] = Field("packed", description="token-balanced packing or padded batches")
    seq_len: int = Field(512, gt=0, description="token slots per packed sequence")
    seqs_per_batch: int = Field(4, gt=0, description="packed sequences per microbatch (per rank)")
    max_images_per_seq: int = Field(16, gt=0, description="AMoE packs up to 16 images per sequence")
    padded_images: int = Field(16, gt=0, description="images per microbatch in padded mode")
    shuffle_buffer: int = Field(2048, gt=0)
    workers: int = Field(2, ge=0, description="DataLoader worker processes")
    prefetch: int = Field(4, gt=0, description="microbatches prefetched per worker")
    flip: bool = Field(False, description="horizontal flip of pixels and target grid (summary kept: approximate)")
    crop: bool = Field(False, description="random crops aligned to the token grid (summary kept: approximate)")
    crop_min_scale: float = Field(0.5, gt=0, le=1, description="smallest crop area as a fraction of the grid")


class OptimConfig(StrictConfig):
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    clip_grad: float | None = Field(1.0, gt=0)
    accumulation: int = Field(1, gt=0, description="microbatches per optimizer step and rank")


class RunConfig(StrictConfig):
    steps: int = Field(1000, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    max_loss_ratio: float = Field(10.0, gt=1, description="a checkpoint whose loss exceeds this multiple of the run's "
                                  "lowest loss is kept but not trusted: a diverged run falls back to the newest trusted one")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    attention: Literal["auto", "dense", "flex"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")
    compile: bool = Field(False, description="torch.compile the student (the Triton MoE ops stay in the graph)")
    compile_backend: str = Field("inductor", description="torch.compile backend (aot_eager: trace only, for tests)")


class TrainConfig(StrictConfig):
    """`pipeline train`: everything a run needs besides the store."""

    @model_validator(mode="before")
    @classmethod
    def _preset_sections(cls, data: Any) -> Any:
        """``model.preset`` also fills the heads, loss and optimizer fields its paper states; given fields win."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("preset"):
            recipe = {k: v for k, v in preset(data["model"]["preset"]).items() if k != "model"}
            return _merge(recipe, data)
        return data

    model: ModelConfig = ModelConfig()
    heads: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model.init_from and self.model.moe.upcycle_from:
            raise ValueError("model.init_from and model.moe.upcycle_from both set: a run starts from one of them")
        urls = [s.url if "://" in s.url else os.path.normpath(s.url) for s in self.data.stores]
        if len(set(urls)) != len(urls):
            raise ValueError(f"data.stores names a store twice: {[s.url for s in self.data.stores]}")
        self.model.moe_layer_ids()
        moe = self.model.moe
        if moe.guide == "tgr" and (moe.kind != "topk" or not self.model.moe_layer_ids()):
            raise ValueError("model.moe.guide = 'tgr' needs token-choice MoE layers (model.moe.layers, model.moe.kind = "
                             "'topk')")
        if self.model.moe.top_k > self.model.moe.experts:
            raise ValueError(f"model.moe.top_k ({self.model.moe.top_k}) exceeds model.moe.experts ({self.model.moe.experts})")
        return self


def with_stores(cfg: TrainConfig, urls: str | list[str] | None) -> TrainConfig:
    """``cfg`` reading the stores ``urls`` (from ``--store``), with the weights of its ``data.stores``.

    Without URLs the config's own ``data.stores`` are used; with them, a config that lists stores must
    list as many (its weights are kept, the URLs given win)."""
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    given = cfg.data.stores
    if not urls:
        if not given:
            raise ValueError("no store to train on: give --store (repeat it for a mixture) or [[data.stores]]")
        return cfg
    if given and len(given) != len(urls):
        raise ValueError(f"{len(urls)} --store given but the config's data.stores lists {len(given)}: "
                         "give one --store per [[data.stores]] entry (their weights are used)")
    stores = [{"url": u, "weight": given[k].weight if given else 1.0} for k, u in enumerate(urls)]
    data = {**cfg.data.model_dump(), "stores": stores}
    return load_config(TrainConfig, None, {**cfg.model_dump(), "data": data})  # ConfigError: one line, the key
