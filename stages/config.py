"""Typed configs of the stage jobs: `cache-teachers` (CacheConfig) and `curate` (CurateConfig).

They live with the jobs they parameterize (``stages.cache``, ``stages.curate``); the CLI only fills
them from flags. The trainer's config is ``train/config.py``; the strict base is ``config``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from config import StrictConfig

__all__ = ["CacheConfig", "CurateConfig"]


class _ModelSource(StrictConfig):
    """Where a job's model comes from and where its replicas compute (``stages.placement``)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when the Ray cluster has GPUs")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="precision of the model's forward (autocast); default bfloat16 on CUDA, float32 on CPU")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs Ray gives each replica (0.5 = two per GPU)")

    def model_spec(self) -> str:
        raise NotImplementedError

    def teacher_kwargs(self) -> dict:
        """Keyword arguments of ``stages.teachers.build_teacher``."""
        return dict(spec=self.model_spec(), weights=self.weights, random_init=self.random_init, seed=self.seed,
                    patch_size=self.patch_size)


class CacheConfig(_ModelSource):
    """`pipeline cache-teachers`: which teacher, the image policy, and how the job is split."""

    teacher: str = Field(description="teacher SPEC, e.g. timm:efficientnet_lite0 or open_clip:ViT-B-16-SigLIP2-256")
    name: str | None = Field(None, description="name of the teacher group in the store (default: the model name)")
    weights: str | None = Field(None, description="safetensors or torch state dict with the teacher's weights")
    random_init: bool = Field(False, description="use seeded random weights (recorded in the fingerprint)")
    seed: int = 0
    codec: Literal["float16", "float32", "bfloat16", "int8"] | None = Field(
        None, description="how teacher features are stored (storage.codecs): float16 (default), float32, bfloat16 "
        "(16-bit words read back as float32) or int8 (one byte a value and a step per row: under half of float16's bytes)")
    dtype: Literal["float16", "float32"] | None = Field(None, description="the older name of codec (plain dtypes); "
                                                        "codec wins where both are set")
    # image policy (AMoE §3.2/§3.4): aspect kept, sides multiple of the patch, tokens clamped
    patch_size: int = Field(16, gt=0)
    min_tokens: int = Field(64, gt=0)
    max_tokens: int = Field(256, gt=0)
    image_format: Literal["png", "jpeg", "webp"] = "png"
    image_quality: int = Field(95, ge=1, le=100)
    labels: str | None = Field(None, description="CSV with columns path,label: stored as the labels array")
    masks: str | None = Field(None, description="CSV path,mask (paths relative to it): per-pixel label maps stored "
                              "with the images as images/masks (segmentation probes); only when the images are "
                              "first cached")
    mask_kind: Literal["classes", "values"] = Field("classes", description="classes: 8-bit class indices (255 = "
                                                    "ignore); values: 16-bit regression targets (65535 = unknown)")
    mask_classes: str | None = Field(None, description="text file naming the mask classes, line i = class i")
    mask_scale: float = Field(1.0, gt=0, description="values masks: the target is the stored value / mask_scale")
    layers: list[int] = Field(default_factory=list, description="teacher blocks k (1-based; a CNN's feature stages) "
                              "whose tokens are also cached as layers/<k> (routing supervision, CKA); adding layers "
                              "to a cached teacher computes only them")
    text_prompts: str | None = Field(None, description="text file, one prompt per line (e.g. captions), encoded by the "
                                     "text tower into text/<text_set>")
    text_classes: str | None = Field(None, description="text file, one class name per line (line i names label i): "
                                     "the text tower's class embeddings (templates x names, averaged) in text/<text_set>")
    text_templates: str | None = Field(None, description="text file of prompt templates with one {} (default: six "
                                       "CLIP ImageNet templates)")
    captions: str | None = Field(None, description="CSV path,caption (several rows per image allowed): the text "
                                 "tower's caption embeddings and their images in text/<text_set> (retrieval)")
    classifier: bool = Field(False, description="store the teacher's linear classifier on its summary as class "
                             "embeddings with their bias (e.g. EfficientNet-Lite's ImageNet head) in text/<text_set>")
    text_set: str | None = Field(None, description="name of the text set (default: prompts, classes or classifier)")
    # job layout
    shard_images: int = Field(256, gt=0, description="images per write unit and per-image zarr shard")
    shard_rows: int | None = Field(None, gt=0, description="rows per zarr shard of the flat patch array (default: "
                                   "sized so a unit spans ~16 shards, at most 16384; storage.shards.flat_shard_rows)")
    chunk_rows: int = Field(256, gt=0, description="rows per inner chunk of patches (random-access read unit)")
    pixel_shard_bytes: int = Field(1 << 24, gt=0)
    pixel_chunk_bytes: int = Field(1 << 18, gt=0)
    fidelity_units: int = Field(64, gt=0, description="units, spread over the store, whose writers measure what "
                                "the codec keeps (codec_fidelity; a second encode of every row, which a GPU "
                                "replica's writer cannot afford on every unit)")
    batch_size: int = Field(32, gt=0, description="most images per teacher batch")
    batch_tokens: int | None = Field(8192, gt=0, description="most student-grid tokens per teacher batch (memory "
                                     "at high resolution: 3 images of 2304 tokens); None: images only")
    workers: int | None = Field(None, gt=0, description="teacher actors (default: one per GPU share on CUDA, 1 on CPU)")
    threads: int | None = Field(None, gt=0, description="torch threads per actor (default: CPUs / workers)")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local cluster (default: all)")
    phis: bool = Field(True, description="estimate PHI-S statistics after caching")
    phis_max_rows: int | None = Field(3_000_000, gt=0, description="rows sampled per feature for PHI-S (AMoE: 3M)")

    def model_spec(self) -> str:
        return self.teacher

    @property
    def feature_codec(self) -> str:
        """The codec the features are stored with (``codec``, else ``dtype``, else float16): a config file that still
        says ``dtype`` takes ``--codec`` from the command line."""
        return self.codec or self.dtype or "float16"

    @model_validator(mode="after")
    def _check(self) -> "CacheConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.shard_rows and self.shard_rows % self.chunk_rows and self.chunk_rows < self.shard_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        if self.pixel_shard_bytes % self.pixel_chunk_bytes:
            raise ValueError("pixel_shard_bytes must be a multiple of pixel_chunk_bytes")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith((".", "_"))):
            raise ValueError(f"teacher name {self.name!r} must be a plain, non-hidden name without '/'")
        kinds = [k for k in ("text_prompts", "text_classes", "captions", "classifier") if getattr(self, k)]
        if len(kinds) > 1:
            raise ValueError(f"one text set per run: {' and '.join(kinds)} were both given")
        if self.mask_classes and self.mask_kind != "classes":
            raise ValueError("mask_classes names the classes of mask_kind = classes")
        if self.mask_scale != 1.0 and self.mask_kind != "values":
            raise ValueError("mask_scale divides the values of mask_kind = values; class masks have none")
        if self.text_templates and not self.text_classes:
            raise ValueError("text_templates needs text_classes (the class names to put into them)")
        if self.text_set is not None and (not self.text_set or "/" in self.text_set or self.text_set.startswith(".")):
            raise ValueError(f"text set name {self.text_set!r} must be a plain name without '/'")
        return self

    def text_set_name(self) -> str | None:
        """The set this run writes (None: no text set)."""
        if self.text_set is not None:
            return self.text_set
        kinds = {"prompts": self.text_prompts, "classes": self.text_classes, "captions": self.captions,
                 "classifier": self.classifier}
        return next((name for name, given in kinds.items() if given), None)


class CurateConfig(_ModelSource):
    """`pipeline curate`: embedder, image policy, hierarchy levels, sampling target, job layout."""

    embedder: str = Field(description="teacher SPEC whose summary embedding clusters the pool, e.g. timm:efficientnet_lite0")
    weights: str | None = Field(None, description="safetensors or torch state dict with the embedder's weights")
    random_init: bool = Field(False, description="seeded random embedder weights (tests)")
    seed: int = 0
    dtype: Literal["float16", "float32"] = Field("float16", description="dtype of DIR/embeddings")
    # image policy: the store's rule (aspect kept, sides multiple of the patch, tokens clamped); the
    # default cap of 196 tokens is the usual 224 x 224 embedding resolution
    patch_size: int = Field(16, gt=0)
    min_tokens: int = Field(16, gt=0)
    max_tokens: int = Field(196, gt=0)
    # hierarchy and sampling (curation/)
    levels: list[int] = Field(description="clusters per level, finest first, strictly decreasing, e.g. [1000, 100, 20]")
    target: int = Field(gt=0, description="number of images to select")
    fit_sample: int | None = Field(None, gt=0, description="fit level 1 on this many random rows; the rest is assigned")
    selection: Literal["random", "closest"] = Field("random", description="how points are picked inside a level-1 cluster")
    refine_steps: int | list[int] | None = Field(None, description="resampling steps per level (default: 0 at level 1, 10 above)")
    points_per_cluster: int | list[int] | None = Field(None, description="resampling r per level (default: half the mean cluster size)")
    n_iter: int = Field(50, gt=0, description="Lloyd iterations per k-means (Vo et al.'s reference: 50)")
    init: Literal["kmeans++", "random"] = "kmeans++"
    spherical: bool = Field(False, description="spherical k-means (cosine) instead of L2")
    chunk_rows: int = Field(65536, gt=0, description="rows read at once when assigning the pool")
    gpu: bool | None = Field(None, description="faiss on GPU (default: when one is visible)")
    fit_workers: int = Field(0, ge=0, description="Ray actors for the level-1 fit, each holding a shard of the fit rows (0 or 1: in this process, faiss)")
    concepts: str | None = Field(None, description="CSV path,concept (or path,label): concept entropy/coverage in metrics.json")
    plots: bool = Field(True, description="write DIR/plots/*.png")
    # job layout
    unit_images: int = Field(1024, gt=0, description="images per embedding unit (commit granularity, zarr chunk)")
    batch_size: int = Field(32, gt=0, description="most images per embedder batch")
    batch_tokens: int | None = Field(8192, gt=0, description="most student-grid tokens per embedder batch")
    workers: int | None = Field(None, gt=0, description="embedder actors (default: one per GPU share on CUDA, 1 on CPU)")
    threads: int | None = Field(None, gt=0, description="torch threads per actor (default: CPUs / workers)")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local cluster (default: all)")

    @field_validator("levels", mode="before")
    @classmethod
    def _split_levels(cls, value):
        if isinstance(value, str):  # "1000,100,20" from the command line
            try:
                return [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"levels must be comma-separated integers, got {value!r}") from None
        return value

    def model_spec(self) -> str:
        return self.embedder

    @model_validator(mode="after")
    def _check(self) -> "CurateConfig":
        if not self.levels:
            raise ValueError("levels must name at least one level, e.g. 1000,100")
        if any(k <= 0 for k in self.levels):
            raise ValueError(f"every level needs a positive number of clusters, got {self.levels}")
        if any(b >= a for a, b in zip(self.levels, self.levels[1:])):
            raise ValueError(f"levels must be strictly decreasing (finest first), got {self.levels}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.weights is not None and self.random_init:
            raise ValueError("weights and random_init exclude each other")
        return self
