"""Class and prompt embeddings a teacher puts in the store (``teachers/<name>/text/<set>``) for zero-shot evaluation.

Three kinds, told apart by the set's ``kind`` attribute so that readers need no project code:

- ``classes`` (a text tower, CLIP/SigLIP evaluation protocol): every class name is put into every
  template, the prompts are encoded and L2-normalized, averaged per class and normalized again;
  ``score = "cosine"``. Class i is label i of the store (``label_aligned``).
- ``classifier`` (a classifier teacher, e.g. EfficientNet-Lite's ImageNet head): the rows are the
  classifier's weights, ``bias`` its bias; ``score = "logit"``: summary · w_c + b_c is exactly the
  teacher's own logit, so the ranking is the teacher's prediction. Not label-aligned (its classes are
  the classifier's, not the store's labels).
- ``prompts`` (free text): one unnormalized embedding per line; ``score = "cosine"``.
- ``captions`` (image-text retrieval): one unnormalized embedding per caption, ``images`` the store row
  of the image each caption describes (an image may have several); ``score = "cosine"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_TEMPLATES", "TextSet", "caption_set", "classifier_set", "class_set", "prompt_set", "read_captions",
           "read_lines"]

# a few of the CLIP ImageNet templates (Radford et al. 2021), enough to average out wording
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
                     "a photo of the small {}.", "a drawing of a {}.", "a close-up photo of a {}.")


@dataclass
class TextSet:
    embeddings: np.ndarray  # [C, D] float32
    attrs: dict = field(default_factory=dict)


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file; refused in one line when there are none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})") from None
    if not lines:
        raise ValueError(f"{path}: no {what} in the file (one per line)")
    return lines


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_set(teacher, classes: list[str], templates: list[str] | tuple[str, ...] = DEFAULT_TEMPLATES) -> TextSet:
    """Per class, the normalized mean of its normalized prompt embeddings (templates × class names)."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates must hold exactly one {{}} for the class name: {bad[:3]}")
    prompts = [t.format(c) for c in classes for t in templates]
    emb = teacher.encode_text(prompts).float().numpy().reshape(len(classes), len(templates), -1)
    return TextSet(_normalize(_normalize(emb).mean(1)).astype(np.float32),
                   {"kind": "classes", "score": "cosine", "classes": list(classes), "templates": list(templates),
                    "label_aligned": True})


def classifier_set(teacher) -> TextSet:
    weight, bias, names = teacher.classifier()
    return TextSet(weight.numpy().astype(np.float32),
                   {"kind": "classifier", "score": "logit", "classes": names, "label_aligned": False,
                    "bias": None if bias is None else [float(b) for b in bias.numpy()]})


def read_captions(path: str, sources: list[str]) -> tuple[list[str], list[int]]:
    """A ``path,caption`` CSV (paths relative to its folder, several rows per image allowed) as (captions,
    the row of the image of each) for the images ``sources`` in store order; refused in one line when it
    captions none of them or names an image that is not among them."""
    import csv

    from .sources import absolute_source, printable_source

    row_of = {absolute_source(s): i for i, s in enumerate(sources)}
    base = Path(path).resolve().parent
    captions, rows = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"path", "caption"} <= set(reader.fieldnames or []):
                raise ValueError(f"captions file {path} needs the columns 'path' and 'caption'")
            for line in reader:
                where = absolute_source(str(base / line["path"]))
                if where not in row_of:
                    raise ValueError(f"captions file {path}: {printable_source(where)} is not one of the images")
                if (line["caption"] or "").strip():
                    captions.append(line["caption"].strip())
                    rows.append(row_of[where])
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the captions ({type(exc).__name__}: {exc})") from None
    if not captions:
        raise ValueError(f"captions file {path} captions none of the {len(sources)} images")
    return captions, rows


def caption_set(teacher, captions: list[str], rows: list[int]) -> TextSet:
    return TextSet(teacher.encode_text(captions).float().numpy(), {"kind": "captions", "score": "cosine",
                                                                   "captions": list(captions), "images": list(rows)})


def prompt_set(teacher, prompts: list[str]) -> TextSet:
    return TextSet(teacher.encode_text(prompts).float().numpy(), {"kind": "prompts", "score": "cosine",
                                                                  "prompts": list(prompts)})
