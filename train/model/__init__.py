"""The student network: ViT backbone over packed sequences, attention, RoPE, its MLPs, teacher heads,
and the distillation model (student + heads) built from a store."""

from .distill import TRAINING_ONLY, DistillModel, GuidePlan, build_model, guide_plan
from .heads import AdaptorHead, FrozenSummaryPool, TeacherDims, TeacherHeads, build_frozen_pool
from .mlp import DenseMLP, build_mlp
from .vit import Student, StudentOutput

__all__ = ["TRAINING_ONLY", "AdaptorHead", "DenseMLP", "DistillModel", "FrozenSummaryPool", "GuidePlan", "Student",
           "StudentOutput", "TeacherDims", "TeacherHeads", "build_frozen_pool", "build_mlp", "build_model", "guide_plan"]
