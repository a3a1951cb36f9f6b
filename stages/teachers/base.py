"""The teacher interface every adapter implements (the cache job only talks to this) and shared helpers."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "COMPUTE_DTYPES",
    "RESAMPLE_RULE",
    "RESIZE_RULE",
    "Teacher",
    "TeacherOutput",
    "attention_pool_config",
    "check_pixels",
    "forward_with_layers",
    "freeze",
    "library_versions",
    "resize_pixels",
    "seeded",
    "size_batches",
    "to_student_grid",
]

# Written into every fingerprint so a store says exactly how its pixels became teacher input.
RESIZE_RULE = "float [0,1], bicubic, antialias=True, align_corners=False, clamp [0,1], then (x-mean)/std"
RESAMPLE_RULE = "bilinear, antialias=True, align_corners=False"
# Precisions a teacher's network may compute in (autocast); inputs, resizing and outputs stay float32.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherOutput:
    summary: torch.Tensor  # [B, Ds] float32: CLS / pooled pre-logits / attention-pool output
    patches: torch.Tensor  # [B, gh, gw, D] float32 on the student grid
    registers: torch.Tensor | None  # [B, R, D] float32 where the model has register tokens
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> [B, gh, gw, Dk]: block k's tokens


class Teacher(ABC):
    """A frozen teacher that turns the store's uint8 pixels into targets on the student grid.

    Built by ``build_teacher``: eval mode, gradients off, float32 weights; the network runs under
    autocast to ``compute_dtype`` (float32: no autocast); outputs are float32 CPU tensors whatever
    ``device`` and precision the model computes in.
    """

    name: str
    spec: str
    embed_dim: int
    summary_dim: int
    num_registers: int
    resampled: bool
    patch_size: int  # the student's patch size P: pixels are (gh·P, gw·P)
    device: torch.device
    compute_dtype: str = "float32"

    def default_compute_dtype(self, device: str) -> str:
        """The precision a replica on ``device`` computes in unless told otherwise: bf16 on CUDA (tensor
        cores), float32 on CPU (bf16 there is slower for most models and only an approximation)."""
        return "bfloat16" if device == "cuda" else "float32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The network call's precision; pixels are resized and tokens resampled in float32 outside it."""
        return torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.compute_dtype],
                              enabled=self.compute_dtype != "float32")

    @abstractmethod
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int], layers: Sequence[int] = ()) -> TeacherOutput:
        """pixels: uint8 [B, 3, H, W] RGB with H = gh·P, W = gw·P; the adapter applies its own input rule.

        ``layers``: blocks k (counted from 1, as the papers do: 12 = the last block of a 12-block ViT) whose
        output tokens come back on the student grid in ``TeacherOutput.layers``, from the same forward."""

    def layer_dims(self, layers: Sequence[int]) -> dict[int, int]:
        """Width of each requested layer (sorted); refuses a layer the model does not have."""
        depth, widths = self.layer_widths()
        bad = [k for k in layers if not 1 <= int(k) <= depth]
        if bad:
            raise ValueError(f"teacher {self.spec} has layers 1..{depth} (blocks, counted from 1); got {bad}")
        return {int(k): widths[int(k) - 1] for k in sorted(set(layers))}

    def layer_widths(self) -> tuple[int, list[int]]:
        """(number of cacheable layers, width of each): blocks of a ViT, feature stages of a CNN."""
        raise ValueError(f"teacher {self.spec} does not expose intermediate layers")

    def layer_rule(self) -> str:
        """What ``layers/<k>`` holds, written next to the arrays (the fingerprint of the other arrays is unchanged)."""
        return "output tokens of block k (1-based), before the final norm, on the student grid"

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-able description of everything that determines the targets."""

    def heads(self) -> dict[str, torch.Tensor]:
        """Frozen parts the student may reuse (e.g. SigLIP2's attention pool); {} if none."""
        return {}

    def heads_config(self) -> dict:
        """JSON-able config that rebuilds ``heads()`` without the teacher's library."""
        return {}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise ValueError(f"teacher {self.spec} has no text tower")

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """``(weight [C, D_summary], bias [C] or None, class names)``: the linear classifier on the summary
        (logits = summary · weightᵀ + bias), for teachers that have one."""
        raise ValueError(f"teacher {self.spec} has no linear classifier on its summary")

    def batches(self, images: Mapping[int, np.ndarray], batch_size: int, max_tokens: int | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor, tuple[int, int]]]:
        """``(keys, uint8 pixels [B, 3, H, W], grid)`` per batch of policy-sized ``[H, W, 3]`` images
        (``size_batches``; ``max_tokens`` counts student-grid tokens)."""
        p = self.patch_size
        shapes = {k: v.shape for k, v in images.items()}
        for keys in size_batches(shapes, batch_size, max_tokens, tokens=lambda s: (s[0] // p) * (s[1] // p)):
            pixels = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).contiguous()
            h, w = pixels.shape[-2:]
            yield keys, pixels, (h // p, w // p)

    def forward_images(self, images: Mapping[int, np.ndarray], batch_size: int, max_tokens: int | None = None,
                       layers: Sequence[int] = ()) -> Iterator[tuple[list[int], TeacherOutput]]:
        """The teacher over policy-sized images, batch by batch, without autograd: ``(keys, output)`` per batch.

        The one batching loop of cache-teachers and embedding (their benchmark times the same ``batches``).
        """
        for keys, pixels, grid in self.batches(images, batch_size, max_tokens):
            with torch.inference_mode():
                out = self.forward(pixels, grid, layers) if layers else self.forward(pixels, grid)
            yield keys, out

    @staticmethod
    def _output(summary, patches, registers, layers: dict[int, torch.Tensor] | None = None) -> TeacherOutput:
        cpu = lambda t: None if t is None else t.detach().to("cpu", torch.float32).contiguous()  # noqa: E731
        return TeacherOutput(cpu(summary), cpu(patches), cpu(registers), {k: cpu(v) for k, v in (layers or {}).items()})


def forward_with_layers(module: torch.nn.Module, x: torch.Tensor, layers: Sequence[int]
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``module.forward_features(x)`` and, from the same pass, the maps ``[B, D, h, w]`` of blocks (or
    feature stages) ``layers`` (1-based) through timm's ``forward_intermediates`` (un-normed, prefix tokens
    dropped); without layers only ``forward_features``."""
    if not layers:
        return module.forward_features(x), {}
    order = sorted(set(int(k) for k in layers))
    final, maps = module.forward_intermediates(x, indices=[k - 1 for k in order], norm=False, output_fmt="NCHW")
    return final, dict(zip(order, maps))


def size_batches(shapes: Mapping[int, tuple], batch_size: int, max_tokens: int | None = None,
                 tokens: Callable[[tuple], int] | None = None) -> list[list[int]]:
    """Keys of equal shape together, shapes and keys in sorted order; at most ``batch_size`` images and,
    with ``max_tokens``, at most that many tokens (``tokens(shape)`` per image) per batch, at least one
    image: a token budget keeps a high-resolution batch (ViT-L at 768 px: 2304 tokens an image) in memory.

    A deterministic order, so that a unit's targets do not depend on which worker computes it or when.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None and (max_tokens < 1 or tokens is None):
        raise ValueError(f"max_tokens must be positive and come with a token count, got {max_tokens}")
    by_shape: dict[tuple, list[int]] = {}
    for key in sorted(shapes):
        by_shape.setdefault(tuple(shapes[key]), []).append(key)
    out = []
    for shape, keys in sorted(by_shape.items()):
        size = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // max(1, tokens(shape))))
        out += [keys[s: s + size] for s in range(0, len(keys), size)]
    return out


def check_pixels(pixels: torch.Tensor, grid: tuple[int, int], patch_size: int) -> None:
    """Refuse input that breaks the store contract rather than compute targets for the wrong grid."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be uint8 [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    gh, gw = grid
    if gh < 1 or gw < 1 or tuple(pixels.shape[-2:]) != (gh * patch_size, gw * patch_size):
        raise ValueError(
            f"pixels {tuple(pixels.shape[-2:])} do not match grid {tuple(grid)} at student patch size {patch_size}"
        )


def resize_pixels(
    pixels: torch.Tensor, size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalized float [B,3,h,w] by ``RESIZE_RULE`` (PIL-like bicubic, up or down)."""
    x = pixels.float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def to_student_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """[B, h, w, D] -> [B, gh, gw, D] by ``RESAMPLE_RULE``; also says whether it resampled.

    Antialiasing only acts when shrinking (a SigLIP 16x16 map onto a small student grid);
    when enlarging it equals plain bilinear.
    """
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens, False
    x = tokens.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).contiguous(), True


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for a model's construction without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def attention_pool_config(pool: torch.nn.Module) -> dict:
    """Constructor arguments of a timm ``AttentionPoolLatent`` (SigLIP's MAP head), read off the module."""
    mlp = getattr(pool, "mlp", None)
    norm = getattr(pool, "norm", None)
    act = type(mlp.act).__name__ if mlp is not None else None
    return {
        "module": "timm.layers.AttentionPoolLatent",
        "in_features": int(pool.kv.in_features),
        "out_features": int(pool.out_features) if mlp is not None else 0,
        "embed_dim": int(pool.kv.in_features),
        "num_heads": int(pool.num_heads),
        "mlp_ratio": (mlp.fc1.out_features / pool.out_features) if mlp is not None else 0.0,
        "latent_len": int(pool.latent_len),
        "latent_dim": int(pool.latent_dim),
        "q_proj": not isinstance(pool.q, torch.nn.Identity),
        "qkv_bias": pool.kv.bias is not None,
        "qk_norm": not isinstance(pool.q_norm, torch.nn.Identity),
        "pos_embed": "abs" if getattr(pool, "pos_embed", None) is not None else "",
        "pool_type": getattr(pool, "pool", "token"),
        "norm_layer": None if norm is None or isinstance(norm, torch.nn.Identity) else type(norm).__name__,
        "norm_eps": float(getattr(norm, "eps", 1e-6)),
        "act_layer": {"GELUTanh": "gelu_tanh", "GELU": "gelu", "QuickGELU": "quick_gelu"}.get(act, act),
    }


def library_versions() -> dict[str, str]:
    import open_clip
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__}
