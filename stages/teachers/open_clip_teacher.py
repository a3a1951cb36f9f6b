"""open_clip teachers (SigLIP2 family): fixed input size, attention-pool summary, optional text tower.

The image is squashed to the model's square input (as SigLIP's own preprocessing does) and its
token map is resampled onto the student grid. The summary is the attention-pool output that
``encode_image(normalize=False)`` returns; the pool's parameters are exported with a config that
rebuilds it as timm's ``AttentionPoolLatent`` so the student reuses it frozen (AMoE §3.1).

Small configurations for tests go through the same code path: dotted overrides edit the open_clip
config (``text_cfg.width=64``), and ``trunk.<arg>=`` overrides are passed to the timm trunk's own
constructor through a derived timm entrypoint (open_clip's ``TimmModel`` forwards no extra
arguments), e.g. ``open_clip:ViT-B-16-SigLIP2-256,embed_dim=64,vision_cfg.image_size=64,
trunk.depth=2,trunk.embed_dim=64,trunk.num_heads=2,text_cfg.width=64,...``.
The real teacher is just ``open_clip:ViT-B-16-SigLIP2-256`` with ``--weights open_clip_model.safetensors``
(the file from the ``timm/ViT-B-16-SigLIP2-256`` hub repo) or, online, the ``webli`` download.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from .base import (RESAMPLE_RULE, RESIZE_RULE, Teacher, TeacherOutput, attention_pool_config, check_pixels,
                   forward_with_layers, freeze,
                   library_versions, resize_pixels, seeded, to_student_grid)
from .spec import ModelSpec
from .weights import file_sha256, load_state_dict, load_strict

__all__ = ["OpenClipTeacher"]

_TOP_LEVEL = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale", "output_dict")


def _deep_set(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    if parents and parents[0] not in ("vision_cfg", "text_cfg"):
        raise ValueError(f"override {dotted!r}: nested keys must start with vision_cfg., text_cfg. or trunk.")
    if not parents and leaf not in _TOP_LEVEL:
        raise ValueError(f"override {dotted!r}: unknown open_clip model setting (known: {', '.join(_TOP_LEVEL)})")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def _derived_trunk(base: str, overrides: dict) -> str:
    """Register (once per process) a timm entrypoint that builds ``base`` with ``overrides``.

    The name carries a hash of the overrides, so equal overrides share one entry across calls.
    """
    import timm
    from timm.models import register_model

    key = json.dumps([base, overrides], sort_keys=True)
    name = f"{base}__derived_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if timm.is_model(name):
        return name

    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        return timm.create_model(base, pretrained=pretrained, **{**kwargs, **overrides})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    setattr(sys.modules[__name__], name, entrypoint)
    register_model(entrypoint)
    return name


class OpenClipTeacher(Teacher):
    def __init__(self, spec: ModelSpec, *, weights: str | Path | None = None, random_init: bool = False,
                 seed: int = 0, patch_size: int = 16, device: str = "cpu", compute_dtype: str = "float32"):
        import open_clip

        base = open_clip.get_model_config(spec.model)
        if base is None:
            raise ValueError(f"unknown open_clip model {spec.model!r}")
        if "timm_model_name" not in base.get("vision_cfg", {}):
            raise ValueError(f"open_clip:{spec.model}: only timm-trunk vision towers (SigLIP/SigLIP2) are supported")
        cfg = copy.deepcopy(base)
        trunk_kwargs = {}
        for key, value in spec.kwargs.items():
            if key.startswith("trunk."):
                arg = key[len("trunk."):]
                if "." in arg:
                    raise ValueError(f"override {key!r}: trunk arguments are flat")
                trunk_kwargs[arg] = value
            else:
                _deep_set(cfg, key, value)
        vision = cfg["vision_cfg"]
        if trunk_kwargs or vision.get("image_size") != base["vision_cfg"].get("image_size"):
            size = vision.get("image_size", 224)
            trunk_kwargs = {"img_size": size, **trunk_kwargs}
            vision["timm_model_name"] = _derived_trunk(base["vision_cfg"]["timm_model_name"], trunk_kwargs)
        self.spec, self.name, self.patch_size = spec.text, spec.model, patch_size
        self.model_cfg, self.trunk_kwargs = cfg, trunk_kwargs
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        pretrained = None
        if weights is None and not random_init:
            if not tags:
                raise ValueError(f"open_clip:{spec.model} has no pretrained tag: pass --weights PATH or --random-init")
            pretrained = tags[0]
        overrides = {k: v for k, v in cfg.items() if k != "custom_text" and v != base.get(k)}
        with seeded(seed):
            model = self._create(open_clip, spec, pretrained, overrides)
        if weights is not None:
            load_strict(model, load_state_dict(weights), str(weights))
            self.weights_info = {"sha256": file_sha256(weights), "path": str(Path(weights).resolve())}
        elif random_init:
            self.weights_info = {"random_init": True, "seed": seed}
        else:
            self.weights_info = {"pretrained": "open_clip", "tag": pretrained}
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.model = freeze(model).to(self.device)
        visual = model.visual
        self.trunk = visual.trunk
        # the tag's preprocessing (SigLIP: mean = std = 0.5, squash) also holds for --weights / --random-init,
        # where open_clip would fall back to CLIP's mean/std
        pre = dict(getattr(visual, "preprocess_cfg", {}) or {})
        if tags:
            pre.update({k: v for k, v in open_clip.get_pretrained_cfg(spec.model, tags[0]).items()
                        if k in ("mean", "std", "interpolation", "resize_mode")})
        self.mean = tuple(float(v) for v in pre.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(v) for v in pre.get("std", (0.5, 0.5, 0.5)))
        self.source_resize_mode = pre.get("resize_mode", "squash")
        size = visual.image_size
        self.image_size = tuple(int(s) for s in size) if isinstance(size, (tuple, list)) else (int(size),) * 2
        ps = self.trunk.patch_embed.patch_size
        self.stride = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))
        self.native_grid = (self.image_size[0] // self.stride, self.image_size[1] // self.stride)
        self.num_registers = 0
        self.embed_dim = int(self.trunk.num_features)
        self.summary_dim = self._summary_dim()
        self.resampled = True  # one fixed native grid; equal to a student grid only by coincidence
        if self.summary_dim != int(cfg["embed_dim"]):
            raise ValueError(
                f"open_clip:{spec.model}: image embedding dim {self.summary_dim} != embed_dim {cfg['embed_dim']} "
                "of the text side; set embed_dim to the trunk width"
            )

    @staticmethod
    def _create(open_clip, spec: ModelSpec, pretrained: str | None, overrides: dict):
        try:
            return open_clip.create_model(spec.model, pretrained=pretrained, **overrides)
        except Exception as exc:
            if pretrained is None:
                raise ValueError(f"cannot build open_clip:{spec.model} ({spec.text!r}): {exc}") from None
            raise RuntimeError(
                f"could not load pretrained weights {pretrained!r} for open_clip:{spec.model} "
                f"({type(exc).__name__}: {str(exc)[:300]}); offline, pass --weights PATH or --random-init "
                "(set HF_HUB_OFFLINE=1 to fail without network retries)"
            ) from None

    def _summary_dim(self) -> int:
        dim = int(self.trunk.num_features)
        for name, layer in self.model.visual.head.named_children():
            if isinstance(layer, torch.nn.Linear):
                dim = layer.out_features
            elif hasattr(layer, "fc2"):
                dim = layer.fc2.out_features
            elif not isinstance(layer, (torch.nn.Dropout, torch.nn.Identity)):
                raise ValueError(f"open_clip:{self.name}: unsupported image head layer {name!r}")
        return int(dim)

    def layer_widths(self) -> tuple[int, list[int]]:
        """The blocks of the timm trunk (all of its width)."""
        return len(self.trunk.blocks), [self.embed_dim] * len(self.trunk.blocks)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int], layers: Sequence[int] = ()) -> TeacherOutput:
        check_pixels(pixels, grid, self.patch_size)
        x = resize_pixels(pixels.to(self.device), self.image_size, self.mean, self.std)
        with self.autocast():
            feats, maps = forward_with_layers(self.trunk, x, layers)  # [B, prefix + h·w, D], after the final norm
            # = encode_image(x, normalize=False), without running the trunk twice
            summary = self.model.visual.head(self.trunk.forward_head(feats))
        tokens = feats.float()[:, self.prefix:].reshape(len(x), *self.native_grid, -1)
        patches, _ = to_student_grid(tokens, grid)
        layer_tokens = {k: to_student_grid(m.float().permute(0, 2, 3, 1), grid)[0] for k, m in maps.items()}
        return self._output(summary, patches, None, layer_tokens)

    def heads(self) -> dict[str, torch.Tensor]:
        out = {}
        parts = {"attn_pool": getattr(self.trunk, "attn_pool", None), "fc_norm": getattr(self.trunk, "fc_norm", None),
                 "head": self.model.visual.head}
        for prefix, module in parts.items():
            if module is not None:
                out.update({f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()})
        return out

    def heads_config(self) -> dict:
        """How summary = head(fc_norm(attn_pool(patch tokens))) is rebuilt from ``heads()``."""
        pool = getattr(self.trunk, "attn_pool", None)
        fc_norm = getattr(self.trunk, "fc_norm", None)
        head = [m for m in self.model.visual.head.children() if not isinstance(m, (torch.nn.Dropout, torch.nn.Identity))]
        if head and not (len(head) == 1 and isinstance(head[0], torch.nn.Linear)):
            raise ValueError(f"open_clip:{self.name}: only identity or linear image heads can be exported")
        return {
            "order": ["attn_pool", "fc_norm", "head"],
            "input": "patch tokens [B, N, D] in row-major order on the teacher's native grid"
            + (f" preceded by {self.prefix} prefix tokens" if self.prefix else ""),
            "native_grid": list(self.native_grid),
            "trunk_pool": getattr(self.trunk, "global_pool", None),
            "attn_pool": attention_pool_config(pool) if pool is not None else None,
            "fc_norm": None if fc_norm is None or isinstance(fc_norm, torch.nn.Identity)
            else {"module": "torch.nn.LayerNorm", "dim": int(fc_norm.normalized_shape[0]), "eps": float(fc_norm.eps)},
            "head": {"module": "torch.nn.Linear", "in_features": head[0].in_features, "out_features": head[0].out_features,
                     "bias": head[0].bias is not None, "name": self._head_name()} if head else None,
            "summary_dim": self.summary_dim,
        }

    def _head_name(self) -> str:
        return next(n for n, m in self.model.visual.head.named_children() if isinstance(m, torch.nn.Linear))

    def _tokenizer(self):
        """The tokenizer open_clip would pick for the (possibly overridden) text config.

        A config whose ``hf_tokenizer_name`` is blanked uses open_clip's bundled BPE (``SimpleTokenizer``);
        that is how the small test configurations tokenize offline.
        """
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        text_cfg = self.model_cfg.get("text_cfg", {})
        context = text_cfg.get("context_length", 77)
        kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        hf_name = text_cfg.get("hf_tokenizer_name")
        if hf_name:
            return HFTokenizer(hf_name, context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
        return SimpleTokenizer(context_length=context, **kwargs)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[P, D_text] unnormalized text embeddings (what ``encode_text(normalize=False)`` returns)."""
        if getattr(self.model, "text", None) is None and not hasattr(self.model, "transformer"):
            raise ValueError(f"open_clip:{self.name} has no text tower")
        try:
            tokenizer = self._tokenizer()
            tokens = tokenizer(list(prompts))
        except Exception as exc:
            hf = self.model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
            raise RuntimeError(
                f"the tokenizer of open_clip:{self.name} is not available ({type(exc).__name__}: {str(exc)[:200]}); "
                + (f"it is the Hugging Face tokenizer {hf!r}, which needs the 'transformers' package and the hub "
                   "(or its files in the local HF cache); it is not available offline" if hf else "")
            ) from None
        with torch.inference_mode():
            return self.model.encode_text(tokens.to(self.device), normalize=False).detach().to("cpu", torch.float32)

    def fingerprint(self) -> dict:
        return {
            "adapter": "open_clip",
            "spec": self.spec,
            "model": self.name,
            "model_cfg": self.model_cfg,
            "trunk_kwargs": self.trunk_kwargs,
            "weights": self.weights_info,
            "input_policy": {
                "resize": f"squash to {list(self.image_size)}; " + RESIZE_RULE,
                "source_resize_mode": self.source_resize_mode,
                "mean": list(self.mean),
                "std": list(self.std),
                "native_patch": self.stride,
                "native_grid": list(self.native_grid),
                "student_patch_size": self.patch_size,
                "resample": RESAMPLE_RULE + " onto the student grid",
            },
            "summary": "attention-pool output (encode_image(normalize=False))",
            "patches": "trunk forward_features tokens (final norm) after the prefix tokens",
            "embed_dim": self.embed_dim,
            "summary_dim": self.summary_dim,
            "num_registers": 0,
            "resampled": self.resampled,
            "versions": library_versions(),
        }
