"""`pipeline data`: write the bundled real image sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, user_errors

app = typer.Typer(help="Write the bundled real image sets (no downloads).", no_args_is_help=True)


@app.command("demo")
def demo_images(
    out: Annotated[Path, typer.Argument(help="output folder")],
    digits_size: Annotated[int, typer.Option("--digits-size", min=8, help="pixel size of the upscaled digits")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="seed of the train/held-out split")] = 0,
) -> None:
    """Photos from scikit-image/scikit-learn plus the 1,797 digits with labels.csv (path,label,split)."""
    from stages.datasets import write_demo_images

    with user_errors(str(out)):
        s = write_demo_images(out, digits_size=digits_size, seed=seed)
    console.print(f"wrote {len(s.photos)} photos to {out / 'photos'} and {len(s.digits)} digits to {out / 'digits'} "
                  f"({s.num_train} train / {s.num_heldout} held out); labels: {s.labels_csv}")


@app.command("longtail")
def longtail(
    out: Annotated[Path, typer.Argument(help="output folder")],
    n_crops: Annotated[int, typer.Option("--n-crops", min=2, help="number of crops")] = 20000,
    head_to_tail: Annotated[float, typer.Option("--head-to-tail", min=1.0, help="crops of the most / least frequent photo")] = 100.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Crops of the bundled photos, Zipf-distributed per photo, with concepts.csv (path,concept)."""
    from stages.datasets import write_longtail_pool

    with user_errors(str(out)):
        pool = write_longtail_pool(out, n_crops=n_crops, head_to_tail=head_to_tail, seed=seed)
    counts = list(pool.counts.values())
    console.print(f"wrote {pool.num_crops} crops of {len(counts)} photos to {out}; most/least frequent "
                  f"{counts[0]}/{counts[-1]} = {counts[0] / counts[-1]:.1f}x; concepts: {pool.concepts_csv}")


@app.command("segmentation")
def segmentation(
    out: Annotated[Path, typer.Argument(help="output folder")],
    n_images: Annotated[int, typer.Option("--n-images", min=1, help="number of images")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Real digits pasted into crops of the real photos, with per-pixel class masks (background + 10 digits)
    and distance-to-digit targets: cache them with `cache-teachers OUT/images --masks OUT/masks.csv`."""
    from stages.datasets import DISTANCE_SCALE, write_segmentation_set

    with user_errors(str(out)):
        s = write_segmentation_set(out, n_images=n_images, seed=seed)
    console.print(f"wrote {len(s.images)} images to {out / 'images'} ({100 * s.digit_pixels:.1f}% digit pixels); "
                  f"class masks: {s.masks_csv} (names: {s.classes_txt}); distance targets: {s.depth_csv} "
                  f"(cache with --set mask_kind=values --set mask_scale={DISTANCE_SCALE})")
