"""Checkpoints: model weights as safetensors, optimizer and RNG state as a weights-only torch file.

A checkpoint is a directory written under a temporary name and renamed into place, then named in
``LATEST``; a crash at any point leaves the previous checkpoint whole and ``LATEST`` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "load_weights"]

MODEL = "model.safetensors"
STATE = "optim.pt"
META = "state.json"
LATEST = "LATEST"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                    keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / STATE)
    (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_text(root / LATEST, final.name)
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / META).exists() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (strict) and, given an optimizer, its state and the RNG; returns the metadata."""
    missing, unexpected = model.load_state_dict(load_file(str(path / MODEL)), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return json.loads((path / META).read_text())


def load_weights(source: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run directory (its latest checkpoint), a ``checkpoints/`` folder or one checkpoint."""
    source = Path(source)
    ckpt = latest_checkpoint(source / "checkpoints") or latest_checkpoint(source) or source
    if not (ckpt / MODEL).is_file():
        raise ValueError(f"no checkpoint found in {source} (a run directory or checkpoint dir)")
    return load_file(str(ckpt / MODEL))
