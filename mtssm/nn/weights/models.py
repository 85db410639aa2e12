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
* ``pamm-official``: PAMM's trained checkpoints (``{'model': ..., 'optimizer': ...}`` of a DDP
  ``PAMEWrapper``): ``backbone.`` holds the ViT (timm names, a position row for a class token it
  never uses) and the decoder: per level ``s`` ``stage_MTLoRA_mamba.{s}`` (``first_decode``,
  ``input_norm``, per task ``task_conv``, ``task_input_norm0``, ``proj_z0``,
  ``dim_expand_proj_x0``, ``x2dt_proj0``, ``dt_proj0``, ``dim_decrease_proj0``, the B / C
  ``MoE``s ``B_proj0`` / ``C_proj0``) and per task ``task_mask.{t}``; heads
  ``heads.{t}.{mt_proj.{0,1},linear_pred}``. The code keeps ``A_log`` and ``D`` in plain dicts at
  their initial values (``log(1..N)``, ones), so the file never holds them and they are set to
  those; its task priors are also unsaved (random at construction, never trained), so they are
  left as they are. ``conv2d0`` (a conv whose output the official forward discards) is dropped.
  The routers' ``SpatialAtt.convsp`` (``Linear(H*W, 1)``) loads into a model built with
  ``router_pool="linear"`` for the same grid.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from mtssm.nn.heads import ConvHead, ExpandHead
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder
from mtssm.nn.mtmamba_pp import SCTMBlock
from mtssm.nn.pamm import PAMMDecoder
from mtssm.nn.weights.encoders import convert_encoder, strip_prefixes
from mtssm.nn.weights.report import IMAGENET, Mapping

__all__ = ["MODEL_LAYOUTS", "convert_model", "model_layout"]

MODEL_LAYOUTS = ("mtssm", "mtmamba-official", "mtmamba_plus-official", "pamm-official")


def model_layout(tensors: dict[str, Tensor]) -> str | None:
    """The whole-model layout of a file's (prefix-stripped) keys, or None."""
    keys = list(tensors)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and any(k.startswith("heads.") for k in keys):
        return "mtssm"
    if any(k.startswith(("backbone.stage_MTLoRA_mamba.", "backbone.task_mask.")) for k in keys):
        return "pamm-official"
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
    _merge_backbone(m, model, tensors)
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


def _fit_numel(m: Mapping, state: dict[str, Tensor], key: str, file_key: str, value: Tensor) -> None:
    """Put ``value`` under ``key``, reshaped to the model's shape when only 1-sized axes differ
    (a 1x1 conv weight read as a Linear, a k x k kernel of k = 1)."""
    target = state.get(key)
    if target is not None and target.shape != value.shape and target.numel() == value.numel():
        squeeze = [d for d in value.shape if d != 1] == [d for d in target.shape if d != 1]
        if squeeze:
            m.put(key, file_key, value.reshape(target.shape), reshaped=True)
            return
    m.put(key, file_key, value)


# official MoE router (SpatialAtt + 1x1 conv) -> mtssm TaskRouter
_PAMM_ROUTER = {
    "0.conv1": "channel_proj", "0.ln": "channel_norm", "0.conv3": "channel_out",
    "0.ln_sp": "spatial_norm", "0.conv2": "spatial_out", "0.convsp": "spatial_pool", "1": "head",
}
_PAMM_BLOCK = {
    "task_conv": "task_conv", "task_input_norm0": "task_norm", "proj_z0": "gate_proj",
    "dim_expand_proj_x0": "in_proj", "x2dt_proj0": "x2dt", "dt_proj0": "dt_proj", "dim_decrease_proj0": "out_proj",
}


def _merge_backbone(m: Mapping, model: nn.Module, tensors: dict[str, Tensor],
                    decoder_modules: tuple[str, ...] = ()) -> None:
    """Map the file's encoder, the tensors under ``backbone.``, into ``model.encoder`` (keys under
    ``encoder.``); keys of ``decoder_modules`` (under ``backbone.`` too) are left to the caller."""
    backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    enc = convert_encoder(model.encoder, backbone)
    if enc.layout == "unknown":
        m.unplaced += [f"backbone.{k}" for k in backbone if not k.startswith(decoder_modules)]
        return
    m.merge(enc, "encoder.")
    m.ignored = [f"backbone.{k}" for k in m.ignored if not k.startswith(decoder_modules)]
    m.unplaced = [f"backbone.{k}" for k in m.unplaced]


def _convert_pamm(tensors: dict[str, Tensor], model: nn.Module, path: str) -> Mapping:
    decoder = model.decoder
    if not isinstance(decoder, PAMMDecoder):
        raise ValueError(f"{path}: an official PAMM checkpoint, but the model's decoder is {type(decoder).__name__}")
    _check_tasks(path, "pamm-official", _file_tasks(list(tensors), r"heads\.(.+)\.linear_pred\.weight$"),
                 tuple(model.tasks))
    state = model.state_dict()
    m = Mapping("pamm-official")
    m.mean, m.std = IMAGENET  # PAMM's data pipeline normalises with ImageNet statistics
    # PAMM's backbone class also holds its decoder's modules; they are mapped below
    _merge_backbone(m, model, tensors, decoder_modules=("stage_MTLoRA_mamba.", "task_mask."))
    experts: dict[str, dict[int, dict[str, tuple[str, Tensor]]]] = {}  # model prefix -> expert -> part
    for key, value in tensors.items():
        if key.startswith("backbone.") and not key.startswith(("backbone.stage_MTLoRA_mamba.", "backbone.task_mask.")):
            continue
        if mt := re.match(r"backbone\.task_mask\.(.+)\.([013])\.(.+)$", key):
            m.put(f"decoder.fusion.{mt.group(1)}.{mt.group(2)}.{mt.group(3)}", key, value)
        elif mt := re.match(r"heads\.(.+)\.mt_proj\.([01])\.(.+)$", key):
            m.put(f"heads.{mt.group(1)}.{'conv' if mt.group(2) == '0' else 'norm'}.{mt.group(3)}", key, value)
        elif mt := re.match(r"heads\.(.+)\.linear_pred\.(weight|bias)$", key):
            m.put(f"heads.{mt.group(1)}.proj.{mt.group(2)}", key, value)
        elif mt := re.match(r"backbone\.stage_MTLoRA_mamba\.(\d+)\.(.+)$", key):
            s, rest = mt.groups()
            pre = f"decoder.blocks.{s}."
            if mr := re.match(r"(first_decode|input_norm)\.(weight|bias)$", rest):
                m.put(pre + ("input_proj" if mr.group(1) == "first_decode" else "input_norm") + f".{mr.group(2)}", key, value)
            elif (mr := re.match(r"(\w+)\.(.+)\.(weight|bias)$", rest)) and mr.group(1) in _PAMM_BLOCK:
                _fit_numel(m, state, f"{pre}{_PAMM_BLOCK[mr.group(1)]}.{mr.group(2)}.{mr.group(3)}", key, value)
            elif rest.startswith("conv2d0."):
                m.ignored.append(key)  # the official forward discards this conv's output
            elif mr := re.match(r"([BC])_proj0\.(.+)$", rest):
                which, sub = f"{pre}{mr.group(1)}_experts.", mr.group(2)
                if me := re.match(r"MoE\.(\d+)\.([WM])\.(weight|bias)$", sub):
                    experts.setdefault(which + "experts.", {}).setdefault(int(me.group(1)), {})[me.group(2) + me.group(3)] = (key, value)
                elif me := re.match(r"proj_task\.(.+)\.([WM])\.(weight|bias)$", sub):
                    experts.setdefault(which + f"task_paths.{me.group(1)}.", {}).setdefault(0, {})[me.group(2) + me.group(3)] = (key, value)
                elif me := re.match(r"proj_gerneral\.(weight|bias)$", sub):
                    _fit_numel(m, state, f"{which}shared_path.{me.group(1)}", key, value)
                elif me := re.match(r"(Bn|Bn_all)\.(.+?)\.(.+)$", sub):
                    norms = "out_norms" if me.group(1) == "Bn" else "mix_norms"
                    m.put(f"{which}{norms}.{me.group(2)}.{me.group(3)}", key, value)
                elif me := re.match(r"router\.(.+?)\.(0\.\w+|1)\.(weight|bias)$", sub):
                    part = _PAMM_ROUTER.get(me.group(2))
                    if part is None:
                        m.unplaced.append(key)
                    else:
                        _fit_numel(m, state, f"{which}routers.{me.group(1)}.{part}.{me.group(3)}", key, value)
                else:
                    m.unplaced.append(key)
            else:
                m.unplaced.append(key)
        else:
            m.unplaced.append(key)
    for prefix, by_expert in experts.items():
        _stack_lora(m, state, prefix, by_expert)
    for s, block in enumerate(decoder.blocks):
        for t in block.tasks:
            n = block.d_state
            m.defaults[f"decoder.blocks.{s}.A_log.{t}"] = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
            m.defaults[f"decoder.blocks.{s}.D.{t}"] = torch.ones(())
            m.absent += [f"decoder.blocks.{s}.prior_{bc}.{t}" for bc in "BC"]
            m.absent += [k for k in state if k.startswith(f"decoder.blocks.{s}.local_conv.{t}.")]
    return m


def _stack_lora(m: Mapping, state: dict[str, Tensor], prefix: str, by_expert: dict[int, dict[str, tuple[str, Tensor]]]) -> None:
    """PAMM's ``LoraConv`` experts (``W``: k x k conv C_in -> R, ``M``: 1x1 conv R -> C_out) stacked
    into mtssm's ``LowRankExperts`` tensors ``down_weight (E, R, C_in[, k, k])``, ``down_bias (E, R)``,
    ``up_weight (E, C_out, R)``, ``up_bias (E, C_out)``."""
    order = sorted(by_expert)
    if order != list(range(len(order))) or any(len(by_expert[e]) != 4 for e in order):
        m.unplaced += [fk for e in order for fk, _ in by_expert[e].values()]
        return
    first = by_expert[0]
    for part, target in (("Wweight", "down_weight"), ("Wbias", "down_bias"), ("Mweight", "up_weight"), ("Mbias", "up_bias")):
        value = torch.stack([by_expert[e][part][1] for e in order])
        if part == "Mweight":
            value = value.flatten(2)  # (E, C_out, R, 1, 1) -> (E, C_out, R)
        file_key = re.sub(r"MoE\.0\.", "MoE.*.", first[part][0])
        _fit_numel(m, state, prefix + target, file_key, value)
        m.reshaped.add(prefix + target)


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
    if layout == "pamm-official":
        return _convert_pamm(tensors, model, path)
    return Mapping("unknown")
