"""The typed configs of each command (one model per command; TOML sections mirror the fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config import StrictConfig

__all__ = ["CacheConfig"]


class CacheConfig(StrictConfig):
    """`pipeline cache-teachers`: which teacher, the image policy, and how the job is split."""

    teacher: str = Field(description="teacher SPEC, e.g. timm:efficientnet_lite0 or open_clip:ViT-B-16-SigLIP2-256")
    name: str | None = Field(None, description="name of the teacher group in the store (default: the model name)")
    weights: str | None = Field(None, description="safetensors or torch state dict with the teacher's weights")
    random_init: bool = Field(False, description="use seeded random weights (recorded in the fingerprint)")
    seed: int = 0
    dtype: Literal["float16", "float32"] = "float16"
    # image policy (AMoE §3.2/§3.4): aspect kept, sides multiple of the patch, tokens clamped
    patch_size: int = Field(16, gt=0)
    min_tokens: int = Field(64, gt=0)
    max_tokens: int = Field(256, gt=0)
    image_format: Literal["png", "jpeg", "webp"] = "png"
    image_quality: int = Field(95, ge=1, le=100)
    labels: str | None = Field(None, description="CSV with columns path,label: stored as the labels array")
    text_prompts: str | None = Field(None, description="text file, one prompt per line, encoded into text/<text_set>")
    text_set: str = "prompts"
    # job layout
    shard_images: int = Field(256, gt=0, description="images per write unit and per-image zarr shard")
    shard_rows: int = Field(16384, gt=0, description="rows per zarr shard of the flat patch array")
    chunk_rows: int = Field(256, gt=0, description="rows per inner chunk of patches (random-access read unit)")
    pixel_shard_bytes: int = Field(1 << 24, gt=0)
    pixel_chunk_bytes: int = Field(1 << 18, gt=0)
    batch_size: int = Field(32, gt=0)
    workers: int = Field(1, gt=0, description="teacher actors")
    threads: int | None = Field(None, gt=0, description="torch threads per actor (default: CPUs / workers)")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local cluster (default: all)")
    phis: bool = Field(True, description="estimate PHI-S statistics after caching")
    phis_max_rows: int | None = Field(3_000_000, gt=0, description="rows sampled per feature for PHI-S (AMoE: 3M)")

    @model_validator(mode="after")
    def _check(self) -> "CacheConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.shard_rows % self.chunk_rows and self.chunk_rows < self.shard_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        if self.pixel_shard_bytes % self.pixel_chunk_bytes:
            raise ValueError("pixel_shard_bytes must be a multiple of pixel_chunk_bytes")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith((".", "_"))):
            raise ValueError(f"teacher name {self.name!r} must be a plain, non-hidden name without '/'")
        return self
