"""What several test folders share: the tiny teachers of the session stores, the digits' class names, and a
two-step student trained on a store through the functions `pipeline train` calls."""

from __future__ import annotations

TINY_VIT = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"
TINY_SIGLIP = ("open_clip:ViT-B-16-SigLIP2-256,embed_dim=64,vision_cfg.image_size=64,trunk.depth=2,"
               "trunk.embed_dim=64,trunk.num_heads=2,text_cfg.width=64,text_cfg.heads=2,text_cfg.layers=1,"
               "text_cfg.context_length=16,text_cfg.vocab_size=49408,text_cfg.hf_tokenizer_name=")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def train_tiny(store: str, run, steps: int = 2) -> None:
    """A tiny student trained ``steps`` steps on ``store`` into the run directory ``run``."""
    from train.config import TrainConfig, with_stores
    from train.rundir import prepare_run
    from train.trainer import train

    cfg = with_stores(TrainConfig.model_validate({
        "model": {"preset": "tiny"}, "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0},
        "optim": {"warmup_steps": 1, "lr": 3e-3}, "run": {"steps": steps, "threads": 1}}), store)
    prepare_run(run, cfg)
    train(cfg, None, run)
