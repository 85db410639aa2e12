"""Encoder layouts: rename a file's Swin / ViT / CNN keys to the mtssm encoders' keys.

Swin layouts (onto :class:`~mtssm.nn.encoders.SwinEncoder`, whose stage i opens with the patch
merging into it and ends with ``norms.{i}``):

* ``swin-official``: the Swin releases (``swin_large_patch4_window12_384_22kto1k.pth``): stage i is
  ``layers.{i}``, its patch merging ``layers.{i}.downsample`` at the END of stage i (i = 0..2),
  ``norm`` the classifier's final LayerNorm; dense-prediction variants add ``norm0``..``norm3``.
* ``swin-timm``: recent timm puts ``layers.{i}.downsample`` at the START of stage i (i = 1..3);
  feature wrappers flatten names to ``layers_{i}``.
* ``swin-mmseg``: mmseg's Swin (and MTMamba's ``swin2mmseg`` output): ``patch_embed.projection``,
  ``stages.{i}.blocks.{j}.attn.w_msa.*``, ``ffn.layers.{0.0,1}``, ``stages.{i}.downsample`` at the
  end of stage i with the 2 x 2 cell features in ``nn.Unfold`` order (channel-major), reordered
  here to the official (cell-major) order; ``norm0``..``norm3``.
* ``mtssm``: :class:`SwinEncoder` state dicts.

ViT layouts (onto :class:`~mtssm.nn.encoders.ViTEncoder`, named as timm names them):

* ``vit-timm``: timm's ``VisionTransformer`` (and mtssm's) names.
* ``vit-google-npz``: Google's ``.npz`` releases (AugReg, as timm, InvPT and PAMM load them):
  ``embedding/kernel`` (p, p, 3, C), ``cls``, ``Transformer/posembed_input/pos_embedding``,
  ``Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1/{query,key,value,out},
  LayerNorm_2,MlpBlock_3/Dense_{0,1}}``, ``Transformer/encoder_norm``; optional ``opt/target/``.

Cached buffers (``relative_position_index``, ``attn_mask``) and classifier heads are dropped. A file
holding a whole model (keys under ``backbone.`` or ``encoder.`` beside others) gives its encoder part.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from mtssm.nn.encoders.cnn import CNNEncoder
from mtssm.nn.encoders.swin import SwinEncoder
from mtssm.nn.encoders.vit import ViTEncoder, resample_pos_embed
from mtssm.nn.weights.report import IMAGENET, INCEPTION, Mapping, format_names

__all__ = [
    "SWIN_LAYOUTS",
    "VIT_LAYOUTS",
    "convert_encoder",
    "fit_encoder_tensor",
    "mmseg_merge_to_official",
    "resize_relative_position_table",
    "strip_prefixes",
]

SWIN_LAYOUTS = ("swin-official", "swin-timm", "swin-mmseg", "mtssm")
VIT_LAYOUTS = ("vit-timm", "vit-google-npz", "mtssm")

_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
_MERGE_ORDER = [0, 2, 1, 3]  # official 2x2 cell order (TL, BL, TR, BR) <-> nn.Unfold's (TL, TR, BL, BR)
# modules of PAMM's backbone class that are its decoder, not the ViT
_PAMM_DECODER = ("stage_MTLoRA_mamba.", "task_mask.")


def strip_prefixes(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``, ...) shared by every key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def _encoder_part(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The encoder's tensors of a whole-model file (``backbone.*`` / ``encoder.*``), and the rest."""
    stripped = strip_prefixes(tensors)
    shared = next(iter(tensors))[: -len(next(iter(stripped)))] if stripped else ""  # e.g. "module."
    for prefix in ("backbone.", "encoder."):
        inside = {k[len(prefix) :]: v for k, v in stripped.items() if k.startswith(prefix)}
        if inside and len(inside) < len(stripped):
            return inside, sorted(shared + k for k in stripped if not k.startswith(prefix))
    return stripped, []


def mmseg_merge_to_official(value: Tensor) -> Tensor:
    """Reorder an mmseg patch-merging ``reduction.weight`` (out, 4C) or ``norm`` (4C,) from
    ``nn.Unfold`` order (index ``c*4 + cell``) to the official concat order (``cell*C + c``).

    The inverse of mmseg's ``swin2mmseg`` reordering (the cell permutation is its own inverse).
    """
    if value.ndim == 1:
        return value.reshape(-1, 4)[:, _MERGE_ORDER].t().reshape(-1).contiguous()
    out = value.shape[0]
    return value.reshape(out, -1, 4)[:, :, _MERGE_ORDER].transpose(1, 2).reshape(out, -1).contiguous()


def _swin_layout(keys: list[str]) -> str | None:
    if any(re.search(r"(^|\.)attn\.w_msa\.|\.ffn\.layers\.|^patch_embed\.projection\.", k) for k in keys):
        return "swin-mmseg"
    if any(re.match(r"stages\.\d+\.blocks\.\d+\.attn\.qkv\.", k) or k.startswith("norms.") for k in keys):
        return "mtssm"
    if any(re.match(r"layers[._]\d+\.blocks\.\d+\.", k) for k in keys):
        ds = {int(m.group(1)) for k in keys if (m := re.match(r"layers[._](\d+)\.downsample\.", k))}
        official = 0 in ds or (3 not in ds and "head.fc.weight" not in keys)
        return "swin-official" if official else "swin-timm"
    return None


def _swin_block_key(rest: str) -> str | None:
    """mtssm name of a block parameter given in official/timm/mmseg spelling (``rest`` after ``blocks.{j}.``)."""
    rest = rest.replace("attn.w_msa.", "attn.")
    rest = re.sub(r"^ffn\.layers\.0\.0\.", "mlp.fc1.", rest)
    rest = re.sub(r"^ffn\.layers\.1\.", "mlp.fc2.", rest)
    if re.match(r"(norm1|norm2)\.(weight|bias)$|attn\.(qkv|proj)\.(weight|bias)$|mlp\.fc[12]\.(weight|bias)$", rest):
        return rest
    if rest == "attn.relative_position_bias_table":
        return rest
    return None


def _convert_swin(tensors: dict[str, Tensor], encoder: SwinEncoder) -> Mapping:
    layout = _swin_layout(list(tensors))
    if layout is None:
        return Mapping("unknown")
    m = Mapping(layout)
    if layout == "mtssm":
        for k, v in tensors.items():
            m.put(k, k, v)
        return m
    m.mean, m.std = IMAGENET
    mmseg = layout == "swin-mmseg"
    merge_at_end = layout in ("swin-official", "swin-mmseg")
    for key, value in tensors.items():
        k = re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)
        if mmseg:
            k = re.sub(r"^stages\.", "layers.", k)
            k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        if re.search(r"(relative_position_index|attn_mask)$", k) or k.startswith("head."):
            m.ignored.append(key)
            continue
        if k.startswith(("patch_embed.proj.", "patch_embed.norm.")):
            m.put(k, key, value)
        elif mt := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            rest = _swin_block_key(mt.group(3))
            if rest is None:
                m.unplaced.append(key)
            else:
                m.put(f"stages.{mt.group(1)}.blocks.{mt.group(2)}.{rest}", key, value)
        elif mt := re.match(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$", k):
            stage = int(mt.group(1)) + (1 if merge_at_end else 0)
            if mmseg:
                m.put(f"stages.{stage}.downsample.{mt.group(2)}", key, mmseg_merge_to_official(value), reshaped=True)
            else:
                m.put(f"stages.{stage}.downsample.{mt.group(2)}", key, value)
        elif mt := re.match(r"norm(\d)\.(weight|bias)$", k):
            m.put(f"norms.{mt.group(1)}.{mt.group(2)}", key, value)
        elif mt := re.match(r"norm\.(weight|bias)$", k):
            m.put(f"norms.3.{mt.group(1)}", key, value)  # the classifier's final norm acts on the last level
        else:
            m.unplaced.append(key)
    m.absent = [f"norms.{i}.{p}" for i in range(3) for p in ("weight", "bias") if f"norms.{i}.{p}" not in m.tensors]
    return m


def _n2p(w: Tensor) -> Tensor:
    """A Flax kernel in PyTorch order: (kh, kw, in, out) -> (out, in, kh, kw); (in, out) -> (out, in)."""
    if w.ndim == 4:
        return w.permute(3, 2, 0, 1)
    if w.ndim == 3:
        return w.permute(2, 0, 1)
    if w.ndim == 2:
        return w.t()
    return w


def _convert_vit_npz(tensors: dict[str, Tensor]) -> Mapping:
    m = Mapping("vit-google-npz")
    m.mean, m.std = INCEPTION
    prefix = "opt/target/" if any(k.startswith("opt/target/") for k in tensors) else ""
    qkv: dict[tuple[int, str, str], tuple[str, Tensor]] = {}
    for key, value in tensors.items():
        k = key[len(prefix) :] if key.startswith(prefix) else key
        value = value.float() if value.dtype == torch.float64 else value
        if k == "embedding/kernel":
            m.put("patch_embed.proj.weight", key, _n2p(value).contiguous(), reshaped=True)
        elif k == "embedding/bias":
            m.put("patch_embed.proj.bias", key, value)
        elif k == "cls":
            m.put("cls_token", key, value)
        elif k == "Transformer/posembed_input/pos_embedding":
            m.put("pos_embed", key, value)
        elif mt := re.match(r"Transformer/encoder_norm/(scale|bias)$", k):
            m.put(f"norm.{'weight' if mt.group(1) == 'scale' else 'bias'}", key, value)
        elif mt := re.match(r"Transformer/encoderblock_(\d+)/(.+)$", k):
            i, rest = int(mt.group(1)), mt.group(2)
            param = lambda s: "weight" if s in ("scale", "kernel") else "bias"  # noqa: E731
            if mn := re.match(r"LayerNorm_([02])/(scale|bias)$", rest):
                m.put(f"blocks.{i}.norm{1 if mn.group(1) == '0' else 2}.{param(mn.group(2))}", key, value)
            elif mn := re.match(r"MultiHeadDotProductAttention_1/(query|key|value)/(kernel|bias)$", rest):
                qkv[(i, mn.group(2), mn.group(1))] = (key, value)
            elif mn := re.match(r"MultiHeadDotProductAttention_1/out/(kernel|bias)$", rest):
                v = _n2p(value).flatten(1).contiguous() if mn.group(1) == "kernel" else value
                m.put(f"blocks.{i}.attn.proj.{param(mn.group(1))}", key, v, reshaped=mn.group(1) == "kernel")
            elif mn := re.match(r"MlpBlock_\d+/Dense_([01])/(kernel|bias)$", rest):
                v = _n2p(value).contiguous() if mn.group(2) == "kernel" else value
                m.put(f"blocks.{i}.mlp.fc{int(mn.group(1)) + 1}.{param(mn.group(2))}", key, v, reshaped=mn.group(2) == "kernel")
            else:
                m.unplaced.append(key)
        elif k.startswith(("head/", "pre_logits/")):
            m.ignored.append(key)
        else:
            m.unplaced.append(key)
    blocks = sorted({(i, kind) for i, kind, _ in qkv})
    for i, kind in blocks:
        parts = [qkv.get((i, kind, n)) for n in ("query", "key", "value")]
        if any(p is None for p in parts):
            m.unplaced += [p[0] for p in parts if p is not None]
            continue
        if kind == "kernel":  # (C, heads, head_dim) each -> (3C, C)
            value = torch.cat([p[1].flatten(1).t() for p in parts]).contiguous()
        else:  # (heads, head_dim) each -> (3C,)
            value = torch.cat([p[1].reshape(-1) for p in parts])
        m.put(f"blocks.{i}.attn.qkv.{'weight' if kind == 'kernel' else 'bias'}", parts[0][0], value, reshaped=True)
    return m


def _convert_vit(tensors: dict[str, Tensor], encoder: ViTEncoder) -> Mapping:
    keys = list(tensors)
    if any(re.search(r"(^|/)Transformer/encoderblock_\d+/", k) for k in keys):
        return _convert_vit_npz(tensors)
    if not any(re.match(r"blocks[._]\d+\.attn\.qkv\.", k) for k in keys):
        return Mapping("unknown")
    m = Mapping("vit-timm")
    for key, value in tensors.items():
        k = re.sub(r"^blocks_(\d+)\.", r"blocks.\1.", key)
        if re.match(r"(head|fc_norm|pre_logits|head_drop)\.", k) or k.startswith(_PAMM_DECODER):
            m.ignored.append(key)
        else:
            m.put(k, key, value)
    return m


def _drop_unused_class_token(m: Mapping, encoder: nn.Module) -> None:
    """An encoder built without a class token drops the file's (as PAMM's ViT does)."""
    if isinstance(encoder, ViTEncoder) and encoder.cls_token is None and "cls_token" in m.tensors:
        m.ignored.append(m.tensors.pop("cls_token")[0])


def convert_encoder(encoder: nn.Module, tensors: dict[str, Tensor]) -> Mapping:
    """Rename a file's tensors to ``encoder``'s keys (shapes are fitted by the caller).

    Returns a :class:`Mapping` whose layout is ``"unknown"`` when no layout of the encoder's family
    recognises the keys. Non-encoder parts of a whole-model file are listed as ignored.
    """
    tensors, rest = _encoder_part(tensors)
    if isinstance(encoder, SwinEncoder):
        m = _convert_swin(tensors, encoder)
    elif isinstance(encoder, ViTEncoder):
        m = _convert_vit(tensors, encoder)
        _drop_unused_class_token(m, encoder)
    elif isinstance(encoder, CNNEncoder):
        own = set(encoder.state_dict())
        m = Mapping("mtssm" if own & set(tensors) else "unknown")
        for k, v in tensors.items():
            m.put(k, k, v)
    else:
        raise TypeError(f"unsupported encoder type {type(encoder).__name__} (expected Swin, ViT or CNN encoders)")
    m.ignored += rest
    return m


def encoder_layouts(encoder: nn.Module) -> tuple[str, ...]:
    """The layout names :func:`convert_encoder` tries for ``encoder``."""
    if isinstance(encoder, SwinEncoder):
        return SWIN_LAYOUTS
    if isinstance(encoder, ViTEncoder):
        return VIT_LAYOUTS
    return ("mtssm",)


def resize_relative_position_table(table: Tensor, window_size: int) -> Tensor:
    """Bicubically resize a Swin bias table ((2w-1)**2, heads) to another window size.

    The table is read as a (heads, 2w-1, 2w-1) image and resized (align_corners=False) to
    (heads, 2w'-1, 2w'-1), returned as ((2w'-1)**2, heads), as the Swin fine-tuning code does.
    """
    n_old, heads = table.shape
    s_old, s_new = math.isqrt(n_old), 2 * window_size - 1
    if s_old * s_old != n_old:
        raise ValueError(f"relative position table has {n_old} rows, not a square (2w-1)**2")
    if s_old == s_new:
        return table
    img = table.float().t().reshape(1, heads, s_old, s_old)
    img = torch.nn.functional.interpolate(img, size=(s_new, s_new), mode="bicubic", align_corners=False)
    return img.reshape(heads, s_new * s_new).t().contiguous().to(table.dtype)


def fit_encoder_tensor(encoder: nn.Module, key: str, value: Tensor, target: Tensor, file_keys: set[str]) -> Tensor | None:
    """Resize ``value`` to ``target``'s shape where ``key`` allows it (bias tables, position
    embeddings); None when it cannot fit. ``file_keys`` are the model keys the file provides."""
    if value.shape == target.shape:
        return value
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == target.shape[1]:
        window = (math.isqrt(target.shape[0]) + 1) // 2
        return resize_relative_position_table(value, window)
    if isinstance(encoder, ViTEncoder) and key == "pos_embed" and value.ndim == 3 and value.shape[2] == target.shape[2]:
        n = value.shape[1]
        # the file's prefix rows: a class-token row when it holds a class token; PAMM's ViT keeps the
        # row without a class token, so a leftover row over a known grid also counts as one
        prefixes = [p for p in ((1, 0) if "cls_token" in file_keys else (0, 1)) if p >= encoder.num_prefix_tokens]
        gh, gw = encoder.grid_size
        same = [p for p in prefixes if n - p == gh * gw]
        for file_prefix in same or prefixes:
            side = math.isqrt(max(n - file_prefix, 0))
            grid = (gh, gw) if same else (side, side)
            if grid[0] * grid[1] != n - file_prefix or n - file_prefix <= 0:
                continue
            value = value[:, file_prefix - encoder.num_prefix_tokens :]
            return resample_pos_embed(value, encoder.grid_size, grid, encoder.num_prefix_tokens)
    return None


def describe_keys(tensors: dict[str, Tensor]) -> str:
    """A few of a file's key names, for an unknown-layout message."""
    return format_names(list(tensors), 4)
