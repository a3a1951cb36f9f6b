"""What several test folders share: the tiny teachers of the session stores, the digits' class names, the
labelled training images, and a two-step student trained on a store through the functions `pipeline train` calls."""

from __future__ import annotations

from pathlib import Path

TINY_VIT = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"
TINY_SIGLIP = ("open_clip:ViT-B-16-SigLIP2-256,embed_dim=64,vision_cfg.image_size=64,trunk.depth=2,"
               "trunk.embed_dim=64,trunk.num_heads=2,text_cfg.width=64,text_cfg.heads=2,text_cfg.layers=1,"
               "text_cfg.context_length=16,text_cfg.vocab_size=49408,text_cfg.hf_tokenizer_name=")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_train_images(root: Path, digits_per_class: int = 4) -> Path:
    """Real photos at several sizes and aspect ratios, labelled digits, and one broken file; returns labels CSV."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rows = ["path,label"]
    for k, photo in enumerate(photos):
        img = Image.fromarray(photo)
        for j, (sx, sy) in enumerate(((0.12, 0.12), (0.2, 0.1), (0.1, 0.25))):
            img.resize((max(16, int(img.width * sx)), max(16, int(img.height * sy)))).save(root / f"photo{k}_{j}.png")
    digits = load_digits()
    picked = np.concatenate([np.flatnonzero(digits.target == c)[:digits_per_class] for c in range(10)])
    for i in picked:
        name = f"digit{i:04d}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).convert("RGB").save(root / name)
        rows.append(f"{root.name}/{name},{digits.target[i]}")
    (root / "broken.png").write_bytes(b"not a png")
    labels = root.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


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
