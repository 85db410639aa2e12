"""Interim weight loading with the interface of :mod:`mtssm.nn.weights` (used until that lands).

``load_encoder_weights(encoder, path)`` and ``load_model_weights(model, path)`` return a
:class:`WeightsReport`; an unknown or unreadable file raises a one-line ``ValueError``. The encoder
formats are those of :func:`mtssm.nn.encoders.load_encoder_weights`; whole models load from mtssm
checkpoints (a run or checkpoint folder, or its ``model.safetensors``) and from plain state dicts
of an mtssm model (``.pt``/``.pth``, optionally wrapped in ``{"model": ...}``, keys optionally
prefixed ``module.``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["WeightsReport", "load_encoder_weights", "load_model_weights"]

_SHOW = 6


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


@dataclass
class WeightsReport:
    """What a weights load did: the file, its detected layout and the keys' fate.

    ``mean``/``std``: the input normalisation recorded with the weights (None when the file does
    not say).
    """

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every file key was used."""
        return not (self.missing or self.unexpected)

    def summary(self) -> str:
        """One line: file, layout and key counts (naming the first missing/unexpected keys)."""
        text = (f"{self.path} ({self.layout}): {len(self.loaded)} loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.reshaped)} reshaped")
        if self.missing:
            text += f"; missing: {_names(self.missing)}"
        if self.unexpected:
            text += f"; unexpected: {_names(self.unexpected)}"
        return text


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> WeightsReport:
    """Load a pretrained encoder file into ``encoder``; see :mod:`mtssm.nn.encoders.weights`."""
    from mtssm.nn.encoders.weights import load_encoder_weights as load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    before = {k for k, _ in encoder.state_dict().items()}
    try:
        res = load(encoder, path, strict=False)
    except (RuntimeError, OSError, EOFError) as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable encoder weights file ({type(exc).__name__})") from None
    skipped = set(res.missing_keys) | set(res.new_keys) | {k.split(":")[0] for k in res.mismatched_keys}
    return WeightsReport(
        path=str(path), layout=res.layout, loaded=sorted(before - skipped), missing=list(res.missing_keys),
        unexpected=list(res.unexpected_keys) + list(res.mismatched_keys), reshaped=list(res.resized_keys),
    )


def _read_model_state(path: Path) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    if path.is_dir() or path.suffix == ".safetensors":
        import safetensors
        import safetensors.torch

        from mtssm.engine.checkpoint import MODEL_FILE, resolve_checkpoint

        file = resolve_checkpoint(path) / MODEL_FILE
        with safetensors.safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        return safetensors.torch.load_file(str(file), device="cpu"), "mtssm", meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (layouts tried: mtssm)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, "mtssm", {}


def load_model_weights(model: nn.Module, path: str | Path) -> WeightsReport:
    """Load whole-model weights from ``path`` into ``model`` (keys must match the model's)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model weights file not found: {path}")
    state, layout, meta = _read_model_state(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unexpected = sorted(k for k in state if k not in fitting)
    result = model.load_state_dict(fitting, strict=False)
    report = WeightsReport(
        path=str(path), layout=layout, loaded=sorted(fitting), missing=sorted(result.missing_keys),
        unexpected=unexpected,
    )
    if meta.get("mtssm_config"):
        json.loads(meta["mtssm_config"])  # a corrupt header fails here, not later
    return report
