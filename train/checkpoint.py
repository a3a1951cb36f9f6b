"""Checkpoints: model weights as safetensors, optimizer and RNG state as a weights-only torch file.

A checkpoint is a directory written under a temporary name and renamed into place, then named in
``LATEST``; a crash at any point leaves the previous checkpoint whole and ``LATEST`` pointing at it.

A checkpoint becomes *trusted* once the loss computed with its weights (the next step's, which is
the first to see them) is finite and within ``run.max_loss_ratio`` of the run's lowest loss
(``mark_trusted``); until then it is unverified. A run that diverges falls back to the newest trusted
checkpoint (``fall_back_to_trusted``), so a checkpoint whose finite but ruined weights made the loss
explode is never what a resume starts from. Pruning never removes the newest trusted checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_weights

from storage.faults import fault_point


__all__ = ["fall_back_to_trusted", "latest_checkpoint", "load_checkpoint", "load_weights", "mark_trusted",
           "save_checkpoint"]

CHECKPOINTS = "checkpoints"  # a run directory's checkpoint folder (``rundir.RunDir.checkpoints``)
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
    """Write ``step_<step>`` (unverified) and name it in LATEST; keep the newest ``keep`` and the newest trusted one."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # written through Python file objects: a failed write (a full disk) is an OSError naming its cause, where
    # safetensors' and torch's own file writers report it as a bare "iostream error" RuntimeError
    with open(tmp / MODEL, "wb") as f:
        f.write(save_weights(state))
    with open(tmp / STATE, "wb") as f:
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, f)
    (tmp / META).write_text(json.dumps({"step": step, "trusted": None, **meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fault_point("checkpoint.rename")
    _atomic_text(root / LATEST, final.name)
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    trusted = _newest_trusted(kept)
    for old in kept[:-keep]:
        if old != trusted:
            shutil.rmtree(old, ignore_errors=True)
    return final


def mark_trusted(root: Path, step: int, trusted: bool) -> None:
    """Record the verdict of the loss computed with ``step_<step>``'s weights (if that checkpoint exists)."""
    path = root / f"step_{step:08d}" / META
    if path.exists():
        meta = json.loads(path.read_text())
        _atomic_text(path, json.dumps({**meta, "trusted": trusted}, indent=1))


def _newest_trusted(checkpoints: list[Path]) -> Path | None:
    for path in reversed(checkpoints):
        try:
            if json.loads((path / META).read_text()).get("trusted", True) is True:  # older checkpoints: trusted
                return path
        except (OSError, ValueError):
            continue
    return None


def fall_back_to_trusted(root: Path) -> Path | None:
    """Point LATEST at the newest trusted checkpoint (none: LATEST is removed and a resume starts over)."""
    trusted = _newest_trusted(sorted(p for p in root.glob("step_*") if p.is_dir()))
    if trusted is not None:
        _atomic_text(root / LATEST, trusted.name)
    elif (root / LATEST).exists():
        (root / LATEST).unlink()
    return trusted


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / META).exists() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    ignore: tuple[str, ...] = ()) -> dict:
    """Load weights (strict but for names starting with an ``ignore`` prefix, neither loaded nor required)
    and, given an optimizer, its state and the RNG; returns the metadata."""
    state = {k: v for k, v in load_file(str(path / MODEL)).items() if not k.startswith(ignore)} if ignore else \
        load_file(str(path / MODEL))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(ignore)] if ignore else missing
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
    ckpt = latest_checkpoint(source / CHECKPOINTS) or latest_checkpoint(source) or source
    if not (ckpt / MODEL).is_file():
        raise ValueError(f"no checkpoint found in {source} (a run directory or checkpoint dir)")
    return load_file(str(ckpt / MODEL))
