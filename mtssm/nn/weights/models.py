"""Whole-model layouts: rename a trained checkpoint's keys to an mtssm model's keys.

* ``mtssm``: a :class:`~mtssm.nn.MultiTaskModel` state dict (``encoder.*``, ``decoder.*``,
  ``heads.*``), e.g. an mtssm run's ``model.safetensors``.
* ``mtmamba-official`` / ``mtmamba_plus-official``: the official MTMamba / MTMamba++ checkpoints
  (``mtmamba[_plus]_{nyud,pascal,cityscapes}.pth.tar``): ``{'model': state_dict}`` of a
  DistributedDataParallel model (keys under ``module.``); the encoder is mmseg's Swin under
  ``backbone.``; per task and stage ``s``: ``expand_layers.{t}_{s}``, ``concat_layers.{t}_{s}`` (a
  Linear in MTMamba, a 1x1 conv in MTMamba++, stored here as a Linear), ``block_1/block_2.{t}_{s}``
  (MTMamba) or ``block_stm.{t}_{s}.{0,1}`` (MTMamba++); per stage ``block_3.{s}`` (CTM) or
  ``block_ctm.{s}.0`` (S-CTM); heads ``final_expand.{t}`` and ``final_project.{t}``. Each SS2D's
  ``dt_projs_bias`` is (4, D) there and (4 D,) here.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from mtssm.nn.heads import ConvHead, ExpandHead
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder
from mtssm.nn.mtmamba_pp import SCTMBlock
from mtssm.nn.weights.encoders import convert_encoder, strip_prefixes
from mtssm.nn.weights.report import IMAGENET, Mapping

__all__ = ["MODEL_LAYOUTS", "convert_model", "model_layout"]

MODEL_LAYOUTS = ("mtssm", "mtmamba-official", "mtmamba_plus-official")


def model_layout(tensors: dict[str, Tensor]) -> str | None:
    """The whole-model layout of a file's (prefix-stripped) keys, or None."""
    keys = list(tensors)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and any(k.startswith("heads.") for k in keys):
        return "mtssm"
    if any(k.startswith("expand_layers.") for k in keys):
        if any(k.startswith(("block_stm.", "block_ctm.")) for k in keys):
            return "mtmamba_plus-official"
        if any(k.startswith(("block_1.", "block_3.")) for k in keys):
            return "mtmamba-official"
    return None


def _file_tasks(keys: list[str], pattern: str) -> list[str]:
    """Task names in the order the file's modules were built (state dicts keep insertion order)."""
    seen: list[str] = []
    for k in keys:
        if (m := re.match(pattern, k)) and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def _check_tasks(path: str, layout: str, file_tasks: list[str], model_tasks: tuple[str, ...]) -> None:
    if set(file_tasks) == set(model_tasks) and tuple(file_tasks) != model_tasks:
        raise ValueError(
            f"{path}: the {layout} checkpoint orders its tasks {file_tasks} but the model {list(model_tasks)}; "
            "the cross-task layers concatenate tasks in order, so build the model with tasks="
            f"{file_tasks}"
        )


def _ss2d_fix(m: Mapping, model_key: str, file_key: str, value: Tensor) -> None:
    if model_key.endswith("dt_projs_bias") and value.ndim == 2:
        m.put(model_key, file_key, value.reshape(-1), reshaped=True)
    else:
        m.put(model_key, file_key, value)


def _convert_mtmamba(tensors: dict[str, Tensor], model: nn.Module, layout: str, path: str) -> Mapping:
    plus = layout == "mtmamba_plus-official"
    decoder, heads = model.decoder, model.heads
    cross_type = SCTMBlock if plus else CTMBlock
    head_type = ConvHead if plus else ExpandHead
    fits = isinstance(decoder, MTMambaDecoder) and all(
        isinstance(s.cross, cross_type) for s in decoder.stages
    ) and all(isinstance(h, head_type) for h in heads.values())
    if not fits:
        want = "MTMamba++ (S-CTM blocks, conv heads)" if plus else "MTMamba (CTM blocks, expand heads)"
        raise ValueError(f"{path}: an official {want} checkpoint, but the model is not built that way")
    _check_tasks(path, layout, _file_tasks(list(tensors), r"final_project\.(.+)\.weight$"), tuple(model.tasks))

    m = Mapping(layout)
    m.mean, m.std = IMAGENET  # both official pipelines normalise with ImageNet statistics
    backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    enc = convert_encoder(model.encoder, backbone)
    if enc.layout == "unknown":
        m.unplaced += [f"backbone.{k}" for k in backbone]
    else:
        m.merge(enc, "encoder.")
        m.ignored = [f"backbone.{k}" for k in m.ignored]
        m.unplaced = [f"backbone.{k}" for k in m.unplaced]
    for key, value in tensors.items():
        if key.startswith("backbone."):
            continue
        if mt := re.match(r"expand_layers\.(.+)_(\d+)\.(expand\.weight|norm\.weight|norm\.bias)$", key):
            m.put(f"decoder.stages.{mt.group(2)}.expand.{mt.group(1)}.{mt.group(3)}", key, value)
        elif mt := re.match(r"concat_layers\.(.+)_(\d+)\.(weight|bias)$", key):
            reshape = value.ndim == 4  # MTMamba++'s 1x1 conv (C, 2C, 1, 1) -> Linear (C, 2C)
            m.put(f"decoder.stages.{mt.group(2)}.fuse.{mt.group(1)}.{mt.group(3)}", key,
                  value.flatten(1) if reshape else value, reshaped=reshape)
        elif mt := re.match(r"block_([12])\.(.+)_(\d+)\.(.+)$", key):
            j = int(mt.group(1)) - 1
            _ss2d_fix(m, f"decoder.stages.{mt.group(3)}.blocks.{mt.group(2)}.{j}.{mt.group(4)}", key, value)
        elif mt := re.match(r"block_stm\.(.+)_(\d+)\.(\d+)\.(.+)$", key):
            _ss2d_fix(m, f"decoder.stages.{mt.group(2)}.blocks.{mt.group(1)}.{mt.group(3)}.{mt.group(4)}", key, value)
        elif mt := re.match(r"block_3\.(\d+)\.(.+)$", key):
            rest = re.sub(r"^in_proj\.", "gate.", mt.group(2))  # the CTM's gate projection
            _ss2d_fix(m, f"decoder.stages.{mt.group(1)}.cross.{rest}", key, value)
        elif mt := re.match(r"block_ctm\.(\d+)\.0\.(.+)$", key):
            _ss2d_fix(m, f"decoder.stages.{mt.group(1)}.cross.{mt.group(2)}", key, value)
        elif mt := re.match(r"final_expand\.(.+)\.(expand\.weight|norm\.weight|norm\.bias)$", key):
            m.put(f"heads.{mt.group(1)}.expand.{mt.group(2)}", key, value)
        elif mt := re.match(r"final_expand\.(.+)\.([01])\.(.+)$", key):
            part = "conv" if mt.group(2) == "0" else "norm"
            m.put(f"heads.{mt.group(1)}.{part}.{mt.group(3)}", key, value)
        elif mt := re.match(r"final_project\.(.+)\.(weight|bias)$", key):
            m.put(f"heads.{mt.group(1)}.proj.{mt.group(2)}", key, value)
        else:
            m.unplaced.append(key)
    return m


def convert_model(model: nn.Module, tensors: dict[str, Tensor], path: str) -> Mapping:
    """Rename a whole-model file's tensors to ``model``'s keys (``layout == "unknown"`` if none fits)."""
    tensors = strip_prefixes(tensors)
    layout = model_layout(tensors)
    if layout == "mtssm":
        m = Mapping("mtssm")
        for k, v in tensors.items():
            m.put(k, k, v)
        return m
    if layout in ("mtmamba-official", "mtmamba_plus-official"):
        return _convert_mtmamba(tensors, model, layout, path)
    return Mapping("unknown")
