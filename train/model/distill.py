"""Student + per-teacher heads: everything that is trained, and the fixed target spaces it predicts in.

``build_model`` makes one from a store (dims, PHI-S spaces, frozen pools) for the trainer, the
evaluation and the benchmarks alike; nothing here loads a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from storage.store import FeatureStore

from ..config import HeadConfig, ModelConfig, TrainConfig
from ..losses import tas_loss
from ..moe import MoEMLP
from ..moe.groups import TokenGroups
from ..moe.tas import TeacherAwareRouter
from ..moe.tgr import RouteGuide, TeacherRouter
from ..packing import PackedLayout
from .heads import TeacherHeads
from .targets import TeacherTargets, load_teacher_targets
from .vit import Student, StudentOutput

__all__ = ["DistillModel", "GuidePlan", "SPARSE_ONLY", "TRAINING_ONLY", "build_model", "guide_plan"]

TRAINING_ONLY = ("guides.",)  # state-dict prefixes of parts only training uses (evaluation loads without them)
SPARSE_ONLY = ("tas.", *TRAINING_ONLY)  # parts that exist only next to MoE layers (a dense run has none to give)


@dataclass(frozen=True)
class GuidePlan:
    """TGR-MoE's wiring for a run: which teacher's cached layers the teacher router of each MoE block reads."""

    teacher: str
    layers: dict[int, int]  # student MoE block (0-based) -> cached teacher layer (1-based, ``layers/<k>``)
    dims: dict[int, int]  # teacher layer -> its width
    teacher_routes: bool  # the upper bound of §5.3 (``model.moe.tgr.routes = "teacher"``)

    @property
    def reads(self) -> dict[str, list[int]]:
        """The cached layers the data loader reads with each image."""
        return {self.teacher: sorted(set(self.layers.values()))}


def guide_plan(cfg: ModelConfig, store: FeatureStore, teachers: list[str]) -> GuidePlan:
    """``model.moe.tgr`` resolved against ``store``: the teacher (default: the first of ``teachers`` with cached
    layers) and the block -> layer map (default: the MoE blocks spread evenly over the cached layers, in
    order, so Table S1's blocks {8, 10, 12} read layers {8, 10, 12}); refused in one line, naming the
    ``--layers`` to cache, where the store cannot serve it."""
    tgr, blocks = cfg.moe.tgr, cfg.moe_layer_ids()
    cached = {t: sorted(int(k) for k in store.teacher_attrs(t).get("layers", [])) for t in teachers}
    hint = ",".join(str(b + 1) for b in blocks)
    if tgr.teacher is not None and tgr.teacher not in teachers:
        raise ValueError(f"model.moe.tgr.teacher '{tgr.teacher}' is not distilled by this run (teachers: "
                         f"{', '.join(teachers)})")
    teacher = tgr.teacher or next((t for t in teachers if cached[t]), None)
    if teacher is None or not cached[teacher]:
        name = teacher or teachers[0]
        raise ValueError(f"{store.url}: model.moe.guide = 'tgr' reads cached teacher layers and the store has none for "
                         f"{'teacher ' + repr(name) if teacher else 'any teacher'}; cache them with `pipeline "
                         f"cache-teachers ... --name {name} --layers {hint}`")
    ks = cached[teacher]
    if tgr.layers is not None:
        stray = sorted(set(tgr.layers) - set(blocks))
        if stray:
            raise ValueError(f"model.moe.tgr.layers names block(s) {stray} that are not MoE blocks ({blocks})")
        missing = sorted(set(tgr.layers.values()) - set(ks))
        if missing:
            raise ValueError(f"{store.url}: model.moe.tgr.layers reads layer(s) {missing} of teacher '{teacher}', which "
                             f"are not cached (cached: {ks}); cache them with `pipeline cache-teachers ... --name "
                             f"{teacher} --layers {','.join(map(str, missing))}`")
        layers = dict(sorted(tgr.layers.items()))
    else:
        n = len(blocks)
        layers = {b: ks[int(j * (len(ks) - 1) / (n - 1) + 0.5) if n > 1 else -1] for j, b in enumerate(blocks)}  # ties deeper
    dims = {int(k): int(v) for k, v in store.teacher_attrs(teacher)["layer_dims"].items()}
    return GuidePlan(teacher, layers, {k: dims[k] for k in set(layers.values())}, tgr.routes == "teacher")


class DistillModel(nn.Module):
    """Predictions per teacher in the space its targets are compared in (PHI-S for summary/patches)."""

    def __init__(self, model_cfg: ModelConfig, head_cfg: HeadConfig, teachers: list[TeacherTargets], *,
                 tas: bool = False, guide: GuidePlan | None = None):
        super().__init__()
        self.student = Student(model_cfg)
        hidden = head_cfg.hidden or model_cfg.dim
        self.heads = nn.ModuleDict()
        self.spaces = nn.ModuleDict()
        for t in teachers:
            if t.spec.registers > model_cfg.registers:
                raise ValueError(f"teacher {t.spec.name} has {t.spec.registers} registers; the student only "
                                 f"{model_cfg.registers}: set model.registers >= {t.spec.registers}")
            self.heads[t.spec.name] = TeacherHeads(t.spec, model_cfg.dim, hidden, head_cfg.share, t.pool)
            self.spaces[t.spec.name] = nn.ModuleDict(t.spaces)
        # M²oT's TAS: a teacher-aware router per token-choice MoE block, which keeps its experts' outputs
        self.tas = nn.ModuleDict()
        if tas:
            blocks = [i for i, b in enumerate(self.student.blocks) if isinstance(b.mlp, MoEMLP)]
            if not blocks:
                raise ValueError("loss.tas needs token-choice MoE layers (model.moe.layers, model.moe.kind = topk)")
            widths = {t.spec.name: t.spec.patch_dim for t in teachers}
            for i in blocks:
                mlp = self.student.blocks[i].mlp
                mlp.keep_expert_outputs = True
                self.tas[str(i)] = TeacherAwareRouter(model_cfg.dim, mlp.num_experts, widths, seed=1000 + i)
        # TGR-MoE: a teacher router per guided MoE block, on a cached teacher layer (training only)
        self.guide, self.guides = guide, nn.ModuleDict()
        for i, k in (guide.layers.items() if guide else ()):
            mlp = self.student.blocks[i].mlp
            if not isinstance(mlp, MoEMLP):
                raise ValueError(f"model.moe.guide = 'tgr' guides block {i}, which is not a token-choice MoE block")
            self.guides[str(i)] = TeacherRouter(guide.dims[k], mlp.router, model_cfg.moe.tgr.noise_std)

    @property
    def teacher_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, pixels: torch.Tensor, layout: PackedLayout, attention: str = "auto",
                layers: dict[str, dict[int, torch.Tensor]] | None = None
                ) -> tuple[dict[str, dict[str, torch.Tensor]], StudentOutput]:
        """``layers``: cached teacher layers of the patch tokens (layout order); given to a TGR model in
        training, its teacher routers guide the routing (without them the student routes, as at inference)."""
        guides = self.route_guides(layout, layers) if self.guides and layers is not None else None
        out = self.student(pixels, layout, attention, guides)
        preds = {name: self.project(name, out, layout) for name in self.heads}
        return preds, out

    def route_guides(self, layout: PackedLayout, layers: dict[str, dict[int, torch.Tensor]]) -> dict[int, RouteGuide]:
        """Each guided block's teacher routing of the patch tokens, from the cached layer its router reads."""
        rows, feats = _patch_rows(layout), layers[self.guide.teacher]
        return {i: RouteGuide(rows, self.guides[str(i)](feats[k]), self.guide.teacher_routes)
                for i, k in self.guide.layers.items()}

    def project(self, name: str, out: StudentOutput, layout: PackedLayout) -> dict[str, torch.Tensor]:
        """Each feature's prediction in the space its targets are compared in: summary and patches in their
        own PHI-S spaces, registers raw (AMoE suppl. §6).

        A shared head (``heads.share``, AMoE §3.1: "the same projection heads for the patch features and
        the global image representation") predicts in one space, the patches' PHI-S space, for every
        token it sees; its CLS and register outputs are mapped from there to raw teacher features
        (inverse patch PHI-S), and the CLS output on into the summary's PHI-S space. So every loss
        compares like with like, which comparing the shared head's output directly with summary
        targets (another mean and rotation) or raw registers would not.
        """
        heads, spaces = self.heads[name], self.spaces[name]
        pred = {"patches": heads.patches(out.patches)}
        if heads.pool is not None:  # AMoE §3.1: the teacher's frozen pool over our projected patches
            raw = spaces["patches"].denormalize(pred["patches"])
            pred["summary"] = spaces["summary"].normalize(heads.pool(raw, layout.patch_image, layout.num_images))
        elif heads.share:
            pred["summary"] = spaces["summary"].normalize(spaces["patches"].denormalize(heads.patches(out.cls)))
        else:
            pred["summary"] = heads.summary(out.cls)
        if heads.spec.registers:
            registers = out.registers[:, : heads.spec.registers]
            pred["registers"] = (spaces["patches"].denormalize(heads.patches(registers)) if heads.share
                                 else heads.registers(registers))
        return pred

    def tas_loss(self, out: StudentOutput, layout: PackedLayout, targets: dict[str, torch.Tensor],
                 global_images: int) -> torch.Tensor:
        """Σ over the TAS blocks of M²oT Eq. 8 (``train.losses.tas_loss``) at the patch tokens, whose targets
        ``targets[teacher]`` [P, D] (PHI-S space, layout order) are this microbatch's; its share of the step."""
        rows = _patch_rows(layout)
        counts = torch.bincount(layout.patch_image, minlength=layout.num_images).clamp_min(1)
        weights = 1.0 / (counts[layout.patch_image].float() * global_images)
        moe_blocks = [i for i, b in enumerate(self.student.blocks) if b.sparse]
        total = weights.new_zeros(())
        for i, aux in zip(moe_blocks, out.aux):
            if str(i) not in self.tas:
                continue
            router = self.tas[str(i)]
            x = aux["moe_input"].index_select(0, rows)
            total = total + tas_loss(aux["expert_out"].index_select(0, rows), aux["router_logits"].index_select(0, rows),
                                     aux["expert_idx"].index_select(0, rows), router.weights(x),
                                     router.project(targets), weights)
        return total

    def raw_summaries(self, preds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Head summaries mapped back into each teacher's own space (PHI-S inverted), for evaluation."""
        return {name: self.spaces[name]["summary"].denormalize(p["summary"]) for name, p in preds.items()}


def _patch_rows(layout: PackedLayout) -> torch.Tensor:
    """Where each patch token (layout order) sits among the real tokens an MoE layer routes."""
    return torch.searchsorted(TokenGroups.from_doc_ids(layout.doc_ids).index, layout.patch_pos)


def build_model(cfg: TrainConfig, store: FeatureStore, teachers: list[str], *, training: bool = False) -> DistillModel:
    """The student and heads for ``teachers`` of ``store``, freshly initialized from the current torch seed;
    ``training`` adds what only training uses (TGR-MoE's teacher routers, which read ``store``'s layers)."""
    targets = [load_teacher_targets(store, t, phis=cfg.loss.phis) for t in teachers]
    guide = guide_plan(cfg.model, store, teachers) if training and cfg.model.moe.guide == "tgr" else None
    return DistillModel(cfg.model, cfg.heads, targets, tas=cfg.loss.tas > 0, guide=guide)
