"""open_clip teachers (SigLIP2 family): fixed input size, attention-pool summary, optional text tower.

The image is squashed to the model's square input (as SigLIP's own preprocessing does); its token
map is resampled onto the student grid. The summary is the attention-pool output that
``encode_image`` returns, and the pool's parameters are exported so the student can reuse it
frozen (AMoE §3.1).
"""

from __future__ import annotations

import copy

import torch

from .base import Teacher, TeacherOutput, library_versions, resize_pixels, to_student_grid
from .spec import TeacherSpec
from .weights import file_sha256, load_state_dict

__all__ = ["OpenClipTeacher"]


def _deep_set(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


class OpenClipTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, *, weights=None, random_init=False, seed=0, patch_size=16):
        import open_clip

        base = open_clip.get_model_config(spec.model)
        if base is None:
            raise ValueError(f"unknown open_clip model {spec.model!r}")
        cfg = copy.deepcopy(base)
        for key, value in spec.kwargs.items():
            _deep_set(cfg, key, value)
        self.spec, self.name, self.model_name, self.model_cfg = spec.text, spec.model, spec.model, cfg
        torch.manual_seed(seed)
        overrides = {k: cfg[k] for k in cfg if k in ("vision_cfg", "text_cfg", "embed_dim") and cfg[k] != base.get(k)}
        pretrained = None
        if not (weights or random_init):
            tags = open_clip.list_pretrained_tags_by_model(spec.model)
            if not tags:
                raise ValueError(f"open_clip:{spec.model} has no pretrained tag: pass --weights or --random-init")
            pretrained = tags[0]
        try:
            model = open_clip.create_model(spec.model, pretrained=pretrained, **overrides)
        except Exception as exc:
            if pretrained:
                raise RuntimeError(
                    f"could not fetch pretrained weights for open_clip:{spec.model} ({type(exc).__name__}: {exc}); "
                    "offline, pass --weights PATH or --random-init"
                ) from None
            raise ValueError(f"cannot build open_clip:{spec.model} with {overrides}: {exc}") from None
        if weights:
            state = load_state_dict(weights)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
            self.weights_info = {"sha256": file_sha256(weights), "path": str(weights)}
        elif random_init:
            self.weights_info = {"random_init": True, "seed": seed}
        else:
            self.weights_info = {"pretrained": pretrained}
        self.model = model.eval().requires_grad_(False)
        visual = model.visual
        self.trunk = getattr(visual, "trunk", None)
        if self.trunk is None or not hasattr(self.trunk, "forward_features"):
            raise ValueError(f"open_clip:{spec.model}: only timm-trunk vision towers (SigLIP/SigLIP2) are supported")
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pre.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(pre.get("std", (0.5, 0.5, 0.5)))
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        ps = self.trunk.patch_embed.patch_size
        self.stride = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))
        self.num_registers = 0
        self.embed_dim = int(self.trunk.num_features)
        with torch.no_grad():
            probe = self.model.encode_image(torch.zeros(1, 3, *self.image_size))
        self.summary_dim = int(probe.shape[-1])
        self.native_grid = (self.image_size[0] // self.stride, self.image_size[1] // self.stride)
        self.resampled = True  # fixed native grid; equal to the student grid only by coincidence

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int]) -> TeacherOutput:
        x = resize_pixels(pixels, self.image_size, self.mean, self.std)
        feats = self.trunk.forward_features(x)
        summary = self.model.encode_image(x, normalize=False)
        tokens = feats[:, self.prefix:].reshape(len(x), *self.native_grid, -1)
        patches, _ = to_student_grid(tokens, grid)
        return TeacherOutput(summary.float(), patches.float(), None)

    def heads(self) -> dict[str, torch.Tensor]:
        pool = getattr(self.trunk, "attn_pool", None)
        out = {}
        if pool is not None:
            out.update({f"attn_pool.{k}": v.detach().clone() for k, v in pool.state_dict().items()})
        head = getattr(self.model.visual, "head", None)
        if head is not None:
            out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        return out

    def heads_config(self) -> dict:
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is None:
            return {}
        mlp = getattr(pool, "mlp", None)
        hidden = mlp.fc1.out_features if mlp is not None else 0
        norm = getattr(pool, "norm", None)
        return {
            "attn_pool": {
                "module": "timm.layers.AttentionPoolLatent",
                "in_features": self.embed_dim,
                "out_features": int(pool.proj.out_features),
                "num_heads": int(pool.num_heads),
                "mlp_ratio": hidden / self.embed_dim if hidden else 0.0,
                "latent_len": int(pool.latent_len),
                "qkv_bias": pool.q.bias is not None,
                "qk_norm": not isinstance(pool.q_norm, torch.nn.Identity),
                "norm_eps": float(getattr(norm, "eps", 1e-6)),
                "pool_type": getattr(pool, "pool", "token"),
                "act_layer": "gelu_tanh" if type(mlp.act).__name__ == "GELUTanh" else "gelu",
            },
            "head": "identity" if not any(k.startswith("head.") for k in self.heads()) else "module",
        }

    def _tokenizer(self):
        """The tokenizer the (possibly overridden) text config names: a HF tokenizer, or open_clip's BPE."""
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        text_cfg = self.model_cfg.get("text_cfg", {})
        context = text_cfg.get("context_length", 77)
        hf_name = text_cfg.get("hf_tokenizer_name")
        if hf_name:
            return HFTokenizer(hf_name, context_length=context, **text_cfg.get("tokenizer_kwargs", {}))
        return SimpleTokenizer(context_length=context)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if not hasattr(self.model, "encode_text"):
            raise ValueError(f"open_clip:{self.model_name} has no text tower")
        try:
            tokens = self._tokenizer()(prompts)
        except Exception as exc:
            raise RuntimeError(
                f"the tokenizer of open_clip:{self.model_name} is not available offline "
                f"({type(exc).__name__}: {str(exc)[:200]}); SigLIP2 needs its Hugging Face tokenizer files"
            ) from None
        with torch.inference_mode():
            return self.model.encode_text(tokens, normalize=False).float()

    def fingerprint(self) -> dict:
        return {
            "adapter": "open_clip",
            "model": self.model_name,
            "model_cfg": self.model_cfg,
            "weights": self.weights_info,
            "input_policy": {
                "resize": "squash to fixed size, bicubic, antialias when shrinking, clamp [0,1]",
                "size": list(self.image_size),
                "mean": list(self.mean),
                "std": list(self.std),
                "native_grid": list(self.native_grid),
                "resample": "bilinear onto the student grid (antialias when shrinking)",
            },
            "summary": "attention-pool output (encode_image, unnormalized)",
            "embed_dim": self.embed_dim,
            "summary_dim": self.summary_dim,
            "num_registers": 0,
            "versions": library_versions(),
        }
