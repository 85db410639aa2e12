"""Load pretrained encoder weights from a local file, mapping key names ourselves.

Supported files (nothing is downloaded):

* official Swin releases (``swin_large_patch4_window12_384_22k.pth`` and friends): a dict with a
  ``"model"`` state dict; stage i is ``layers.{i}`` and its patch merging ``layers.{i}.downsample``
  sits at the END of stage i (i = 0..2); ``norm`` is the classifier's final LayerNorm; cached
  ``attn_mask`` / ``relative_position_index`` buffers and the ``head`` are dropped;
* official dense-prediction Swin checkpoints (``norm0``..``norm3`` per-output norms, optional
  ``backbone.`` prefix);
* timm Swin checkpoints (safetensors or .pth): recent timm puts ``layers.{i}.downsample`` at the
  START of stage i (i = 1..3); feature-extraction wrappers flatten names to ``layers_{i}`` and may
  prefix ``model.``; both are handled;
* timm ViT checkpoints (``vit_large_patch16_384`` and the like: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}``, ``norm``; ``head`` dropped);
* state dicts saved from the mtssm encoders themselves.

Relative position bias tables are resized bicubically when the window sizes differ (as the Swin
fine-tuning code does) and the ViT position embedding is resampled to the model's grid. ``.pth``
files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtssm.nn.encoders.cnn import CNNEncoder
from mtssm.nn.encoders.swin import SwinEncoder
from mtssm.nn.encoders.vit import ViTEncoder, resample_pos_embed

__all__ = [
    "LoadResult",
    "convert_state_dict",
    "load_encoder_weights",
    "read_state_dict",
    "resize_relative_position_table",
]

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "params")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_MAX_NAMES = 12


@dataclass
class LoadResult:
    """What :func:`load_encoder_weights` did.

    Attributes:
        layout: the key layout recognised in the file ("swin-official", "swin-timm", "vit-timm",
            "mtssm").
        missing_keys: model keys the file does not provide (left at their current values).
        unexpected_keys: file keys (as named in the file) with no place in the model.
        mismatched_keys: "model_key: file shape vs model shape" for tensors that cannot be fitted.
        ignored_keys: file keys dropped on purpose (classifier head, cached masks and indices).
        new_keys: model keys a classification checkpoint cannot hold (the per-output norms of the
            first three Swin levels), left at their initial values; not counted as missing.
        resized_keys: model keys resized to fit (relative position tables, position embeddings).
    """

    layout: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    resized_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every file key used or deliberately dropped."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMES])
    more = f", ... (+{len(keys) - _MAX_NAMES} more)" if len(keys) > _MAX_NAMES else ""
    return f"[{shown}{more}]"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` dict from a .safetensors or a torch .pth/.pt/.bin/.ckpt file.

    Unwraps a top-level ``"model"`` / ``"state_dict"`` entry (official releases, Lightning) and
    strips a prefix shared by every key (``module.``, ``model.``, ``backbone.``, ``encoder.``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path}: cannot be read with torch.load(weights_only=True) (it holds non-tensor "
                f"objects: {first}); re-save only its state dict"
            ) from None
    # unwrap {"model": {...}} (official releases), {"state_dict": {...}, "epoch": 3} (trainers)
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path}: holds no tensors (keys {_names(sorted(map(str, obj)))})")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def resize_relative_position_table(table: Tensor, window_size: int) -> Tensor:
    """Bicubically resize a Swin bias table ((2w-1)**2, heads) to another window size.

    The table is read as a (heads, 2w-1, 2w-1) image and resized (align_corners=False) to
    (heads, 2w'-1, 2w'-1), returned as ((2w'-1)**2, heads).
    """
    n_old, heads = table.shape
    s_old, s_new = math.isqrt(n_old), 2 * window_size - 1
    if s_old * s_old != n_old:
        raise ValueError(f"relative position table has {n_old} rows, not a square (2w-1)**2")
    if s_old == s_new:
        return table
    img = table.float().t().reshape(1, heads, s_old, s_old)
    img = F.interpolate(img, size=(s_new, s_new), mode="bicubic", align_corners=False)
    return img.reshape(heads, s_new * s_new).t().contiguous().to(table.dtype)


def _convert_swin(state: dict[str, Tensor]) -> tuple[str, dict[str, tuple[str, Tensor]], list[str], list[str]]:
    """Map official/timm Swin names to :class:`SwinEncoder` names.

    Returns (layout, {model_key: (file_key, tensor)}, ignored file keys, unplaced file keys).
    """
    if any(k.startswith("stages.") or k.startswith("norms.") for k in state):
        return "mtssm", {k: (k, v) for k, v in state.items()}, [], []
    renamed = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): (k, v) for k, v in state.items()}
    ds_stages = {int(m.group(1)) for k in renamed if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    official = 0 in ds_stages or (3 not in ds_stages and "head.fc.weight" not in renamed)
    layout = "swin-official" if official else "swin-timm"
    out: dict[str, tuple[str, Tensor]] = {}
    ignored, unplaced = [], []
    for key, (orig, value) in renamed.items():
        if re.search(r"(relative_position_index|attn_mask)$", key) or key.startswith("head."):
            ignored.append(orig)
            continue
        new = None
        if key.startswith("patch_embed.proj.") or key.startswith("patch_embed.norm."):
            new = key
        elif m := re.match(r"layers\.(\d+)\.blocks\.(.+)$", key):
            new = f"stages.{m.group(1)}.blocks.{m.group(2)}"
        elif m := re.match(r"layers\.(\d+)\.downsample\.(.+)$", key):
            stage = int(m.group(1)) + (1 if official else 0)
            new = f"stages.{stage}.downsample.{m.group(2)}"
        elif m := re.match(r"norm(\d)\.(weight|bias)$", key):
            new = f"norms.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"norm\.(weight|bias)$", key):
            new = f"norms.3.{m.group(1)}"  # the classifier's final norm acts on the last level
        if new is None:
            unplaced.append(orig)
        else:
            out[new] = (orig, value)
    return layout, out, ignored, unplaced


def _convert_vit(state: dict[str, Tensor]) -> tuple[str, dict[str, tuple[str, Tensor]], list[str], list[str]]:
    """Map timm ViT names to :class:`ViTEncoder` names (the same apart from wrappers and heads)."""
    out: dict[str, tuple[str, Tensor]] = {}
    ignored = []
    for orig, value in state.items():
        key = re.sub(r"^blocks_(\d+)\.", r"blocks.\1.", orig)
        if re.match(r"(head|fc_norm|pre_logits|head_drop)\.", key):
            ignored.append(orig)
            continue
        out[key] = (orig, value)
    return "vit-timm", out, ignored, []


def convert_state_dict(
    encoder: nn.Module, state: dict[str, Tensor]
) -> tuple[str, dict[str, tuple[str, Tensor]], list[str], list[str], list[str]]:
    """Rename a checkpoint's keys to ``encoder``'s names.

    Returns (layout, {model_key: (file_key, tensor)}, ignored file keys, unplaced file keys,
    new model keys), see :class:`LoadResult`. Shapes are not checked here.
    """
    if isinstance(encoder, SwinEncoder):
        layout, mapped, ignored, unplaced = _convert_swin(state)
        new = []
        if layout != "mtssm":
            new = [f"norms.{i}.{p}" for i in range(3) for p in ("weight", "bias") if f"norms.{i}.{p}" not in mapped]
        return layout, mapped, ignored, unplaced, new
    if isinstance(encoder, ViTEncoder):
        return (*_convert_vit(state), [])
    if isinstance(encoder, CNNEncoder):
        return "mtssm", {k: (k, v) for k, v in state.items()}, [], [], []
    raise TypeError(f"load_encoder_weights: unsupported encoder type {type(encoder).__name__}")


def _fit(encoder: nn.Module, key: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Resize ``value`` to ``target``'s shape where the key allows it; None if it cannot fit."""
    if value.shape == target.shape:
        return value
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == target.shape[1]:
        window = (math.isqrt(target.shape[0]) + 1) // 2
        return resize_relative_position_table(value, window)
    if isinstance(encoder, ViTEncoder) and key == "pos_embed" and value.ndim == 3 and value.shape[2] == target.shape[2]:
        n = value.shape[1] - encoder.num_prefix_tokens
        side = math.isqrt(max(n, 0))
        if side * side == n:
            return resample_pos_embed(value, encoder.grid_size, (side, side), encoder.num_prefix_tokens)
    return None


def load_encoder_weights(encoder: nn.Module, path: str | Path, strict: bool = True) -> LoadResult:
    """Load a local checkpoint into an mtssm encoder, mapping official Swin / timm key names.

    Args:
        encoder: a :class:`SwinEncoder`, :class:`ViTEncoder` or :class:`CNNEncoder`.
        path: a .safetensors, or a .pth/.pt/.bin file readable with ``weights_only=True``.
        strict: raise ``ValueError`` (one line naming the keys) if any model key is missing, any
            file key has no place in the model, or a shape cannot be fitted. With
            ``strict=False`` everything that fits is loaded and the rest is reported.

    Returns:
        A :class:`LoadResult` naming every missing, unexpected, mismatched, ignored, new and
        resized key.
    """
    encoder = getattr(encoder, "_orig_mod", encoder)  # a torch.compile wrapper shares the parameters
    state = read_state_dict(path)
    layout, mapped, ignored, unplaced, new = convert_state_dict(encoder, state)
    model_state = encoder.state_dict()
    result = LoadResult(layout=layout, ignored_keys=sorted(ignored), new_keys=sorted(new))
    result.unexpected_keys = sorted(unplaced + [orig for k, (orig, _) in mapped.items() if k not in model_state])
    to_load: dict[str, Tensor] = {}
    for key, target in model_state.items():
        if key not in mapped:
            if key not in new:
                result.missing_keys.append(key)
            continue
        value = mapped[key][1]
        fitted = _fit(encoder, key, value, target)
        if fitted is None:
            result.mismatched_keys.append(f"{key}: {tuple(value.shape)} vs {tuple(target.shape)}")
            continue
        if fitted is not value:
            result.resized_keys.append(key)
        to_load[key] = fitted
    if strict and not result.ok:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing keys {_names(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected keys {_names(result.unexpected_keys)}")
        if result.mismatched_keys:
            parts.append(f"{len(result.mismatched_keys)} shape mismatches {_names(result.mismatched_keys)}")
        raise ValueError(
            f"{path}: does not fit {type(encoder).__name__} ({layout} layout): {'; '.join(parts)}; "
            "pass strict=False to load the rest"
        )
    encoder.load_state_dict(to_load, strict=False)
    return result
