"""Load weights from local files into mtssm encoders and models, mapping other projects' layouts.

>>> report = load_encoder_weights(model.encoder, "mmseg_swin_large_patch4_window12_384_22kto1k.pth")  # doctest: +SKIP
>>> print(report.summary())                                                                         # doctest: +SKIP
mmseg_swin_large_...pth: swin-mmseg layout, 329 loaded, 3 reshaped, 37 ignored, ...; input mean (0.485, ...)
>>> load_model_weights(model, "mtmamba_nyud.pth.tar")                                             # doctest: +SKIP

The file's container (PyTorch zip or pickle, safetensors, NumPy ``.npz``) and its key layout are
recognised from its content, not its name. Encoder layouts are listed in
:mod:`mtssm.nn.weights.encoders` (official / timm / mmseg Swin, timm / Google ``.npz`` ViT, mtssm),
whole-model layouts in :mod:`mtssm.nn.weights.models` (mtssm, the official MTMamba / MTMamba++ /
PAMM trained checkpoints). A file of no known layout, a truncated or corrupt file, and a file that
holds no weights each raise a one-line ``ValueError`` naming the file; with ``strict`` (the default)
so does a file that leaves model keys missing, has keys the model cannot place, or shapes that do
not fit. Nothing is downloaded; ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from mtssm.nn.weights.encoders import (
    convert_encoder,
    describe_keys,
    encoder_layouts,
    fit_encoder_tensor,
    mmseg_merge_to_official,
    resize_relative_position_table,
)
from mtssm.nn.weights.files import WeightsFile, read_weights
from mtssm.nn.weights.models import MODEL_LAYOUTS, convert_model
from mtssm.nn.weights.report import IMAGENET, INCEPTION, Mapping, WeightsReport

__all__ = [
    "IMAGENET",
    "INCEPTION",
    "WeightsFile",
    "WeightsReport",
    "load_encoder_weights",
    "load_model_weights",
    "mmseg_merge_to_official",
    "read_weights",
    "resize_relative_position_table",
]


def _apply(module: nn.Module, mapping: Mapping, path: Path, strict: bool, encoder_prefix: str | None) -> WeightsReport:
    """Fit the mapped tensors to ``module``'s shapes, load them, and report."""
    state = module.state_dict()
    report = WeightsReport(
        path=str(path), layout=mapping.layout, mean=mapping.mean, std=mapping.std,
        ignored=sorted(mapping.ignored), absent=sorted(k for k in mapping.absent if k in state),
    )
    report.unexpected = sorted(mapping.unplaced + [fk for k, (fk, _) in mapping.tensors.items() if k not in state])
    encoder = None
    if encoder_prefix is not None:
        encoder = getattr(module, encoder_prefix.rstrip("."), None) if encoder_prefix else module
    provided = set(mapping.tensors)
    to_load: dict[str, Tensor] = {}
    for key, target in state.items():
        if key in mapping.tensors:
            value = mapping.tensors[key][1]
            fitted = value if value.shape == target.shape else None
            if fitted is None and encoder is not None and key.startswith(encoder_prefix or ""):
                sub = key[len(encoder_prefix or "") :]
                fitted = fit_encoder_tensor(encoder, sub, value, target, {k[len(encoder_prefix or "") :] for k in provided})
                if fitted is not None:
                    report.resampled.append(key)
            if fitted is None:
                report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(target.shape)}")
                continue
            if key in mapping.reshaped:
                report.reshaped.append(key)
            to_load[key] = fitted
            report.loaded.append(key)
        elif key in mapping.defaults:
            to_load[key] = mapping.defaults[key].to(target.dtype).expand_as(target)
            report.defaults.append(key)
        elif key not in report.absent:
            report.missing.append(key)
    if strict and not report.ok:
        raise ValueError(
            f"{path}: does not fit {type(module).__name__} ({mapping.layout} layout): {report.problems()}; "
            "pass strict=False to load the rest"
        )
    module.load_state_dict(to_load, strict=False)
    return report


def _unknown(path: Path, what: str, tried: tuple[str, ...], tensors: dict[str, Tensor]) -> ValueError:
    return ValueError(
        f"{path}: unknown weights layout for {what} (tried {', '.join(tried)}); its keys start "
        f"{describe_keys(tensors)}"
    )


def load_encoder_weights(encoder: nn.Module, path: str | Path, strict: bool = True) -> WeightsReport:
    """Load a local weights file into an mtssm encoder, mapping the file's layout to mtssm's names.

    Args:
        encoder: a :class:`~mtssm.nn.encoders.SwinEncoder`, ``ViTEncoder`` or ``CNNEncoder`` (a
            ``torch.compile`` wrapper of one is fine).
        path: a weights file: official / timm / mmseg Swin, timm / Google ``.npz`` ViT, an mtssm
            encoder or whole model, or an official trained model (its encoder part is taken).
        strict: raise a one-line ``ValueError`` if a model key is missing, a file key has no place,
            or a shape cannot be fitted; ``strict=False`` loads everything that fits and reports
            the rest.

    Returns:
        A :class:`WeightsReport`; its ``mean`` / ``std`` are the input normalisation the weights
        were trained with when the layout tells (ImageNet for Swin, 0.5 for Google's ViT).
    """
    encoder = getattr(encoder, "_orig_mod", encoder)
    file = read_weights(path)
    mapping = convert_encoder(encoder, file.tensors)
    if mapping.layout == "unknown":
        raise _unknown(file.path, type(encoder).__name__, encoder_layouts(encoder), file.tensors)
    return _apply(encoder, mapping, file.path, strict, encoder_prefix="")


def load_model_weights(model: nn.Module, path: str | Path, strict: bool = True) -> WeightsReport:
    """Load a whole-model weights file into an mtssm :class:`~mtssm.nn.MultiTaskModel`.

    Args:
        model: the model, built with the hyperparameters the file was trained with.
        path: an mtssm model state dict (``.safetensors`` / ``.pth``, or a checkpoint folder holding
            ``model.safetensors``), or an official trained checkpoint (MTMamba, MTMamba++, PAMM).
        strict: as in :func:`load_encoder_weights`.

    Returns:
        A :class:`WeightsReport` (``mean`` / ``std``: the normalisation the official model was
        trained with, when the layout is an official one).
    """
    model = getattr(model, "_orig_mod", model)
    file = read_weights(path)
    mapping = convert_model(model, file.tensors, str(file.path))
    if mapping.layout == "unknown":
        raise _unknown(file.path, type(model).__name__, MODEL_LAYOUTS, file.tensors)
    return _apply(model, mapping, file.path, strict, encoder_prefix="encoder.")
