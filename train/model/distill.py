"""Student + per-teacher heads: everything that is trained, and the fixed target spaces it predicts in.

``build_model`` makes one from a store (dims, PHI-S spaces, frozen pools) for the trainer, the
evaluation and the benchmarks alike; nothing here loads a teacher.
"""

from __future__ import annotations

import torch
from torch import nn

from storage.store import FeatureStore

from ..config import HeadConfig, ModelConfig, TrainConfig
from ..losses import tas_loss
from ..moe import MoEMLP
from ..moe.groups import TokenGroups
from ..moe.tas import TeacherAwareRouter
from ..packing import PackedLayout
from .heads import TeacherHeads
from .targets import TeacherTargets, load_teacher_targets
from .vit import Student, StudentOutput

__all__ = ["DistillModel", "build_model"]


class DistillModel(nn.Module):
    """Predictions per teacher in the space its targets are compared in (PHI-S for summary/patches)."""

    def __init__(self, model_cfg: ModelConfig, head_cfg: HeadConfig, teachers: list[TeacherTargets], *,
                 tas: bool = False):
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

    @property
    def teacher_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, pixels: torch.Tensor, layout: PackedLayout, attention: str = "auto"
                ) -> tuple[dict[str, dict[str, torch.Tensor]], StudentOutput]:
        out = self.student(pixels, layout, attention)
        preds = {name: self.project(name, out, layout) for name in self.heads}
        return preds, out

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
        rows = torch.searchsorted(TokenGroups.from_doc_ids(layout.doc_ids).index, layout.patch_pos)
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


def build_model(cfg: TrainConfig, store: FeatureStore, teachers: list[str]) -> DistillModel:
    """The student and heads for ``teachers`` of ``store``, freshly initialized from the current torch seed."""
    targets = [load_teacher_targets(store, t, phis=cfg.loss.phis) for t in teachers]
    return DistillModel(cfg.model, cfg.heads, targets, tas=cfg.loss.tas > 0)
