"""The student network: ViT backbone over packed sequences, attention, RoPE, teacher heads."""

from .heads import AdaptorHead, FrozenSummaryPool, TeacherHeads, TeacherSpec, build_frozen_pool
from .vit import DenseMLP, Student, StudentOutput, patchify

__all__ = ["AdaptorHead", "DenseMLP", "FrozenSummaryPool", "Student", "StudentOutput", "TeacherHeads", "TeacherSpec",
           "build_frozen_pool", "patchify"]
