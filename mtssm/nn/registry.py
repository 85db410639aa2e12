"""Model registry: named hyperparameter sets, and the decoder builders that turn them into models.

Each entry of :data:`MODEL_CONFIGS` is ONLY hyperparameters (no weights, no preprocessing):

- ``encoder``: a name for :func:`mtssm.nn.encoders.create_encoder`; ``encoder_kwargs``: its overrides.
- ``decoder``: a key of :data:`DECODERS`.
- ``dataset`` (``nyud``, ``pascal``, ``cityscapes``) and optionally ``tasks`` (default: the dataset's).
- everything else goes to the decoder builder (channels, depths, drop path, SSM settings, ...).

Names read ``<method>_<encoder>_<dataset>``; ``<method>_tiny`` uses the small CNN encoder and the NYUD
tasks, for tests and CPU runs. A builder is ``builder(encoder_channels, tasks, **hparams) ->
(decoder, heads)`` with ``tasks`` the ``{task: C_t}`` map of :func:`mtssm.nn.tasks.resolve_tasks`.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtssm.nn.model import MultiTaskModel, feature_channels
from mtssm.nn.mtmamba import build_mtmamba
from mtssm.nn.mtmamba_pp import build_mtmamba_pp
from mtssm.nn.msm import build_msm
from mtssm.nn.pamm import build_pamm
from mtssm.nn.tasks import resolve_tasks

__all__ = ["DECODERS", "MODEL_CONFIGS", "create_model", "list_models", "model_config", "register_model"]

DecoderBuilder = Callable[..., tuple[nn.Module, nn.ModuleDict]]

#: Decoder type name -> builder ``(encoder_channels, tasks, **hparams) -> (decoder, heads)``.
DECODERS: dict[str, DecoderBuilder] = {
    "mtmamba": build_mtmamba,
    "mtmamba_pp": build_mtmamba_pp,
    "msm": build_msm,
    "pamm": build_pamm,
}

_SWIN_L = {"encoder": "swin_large", "drop_path_rate": 0.2, "depths": (2, 2, 2)}
_TINY = {
    "encoder": "cnn_tiny",
    "encoder_kwargs": {"channels": (16, 32, 64, 128)},
    "dataset": "nyud",
    "depths": (1, 1, 1),
    "d_state": 4,
    "drop_path_rate": 0.1,
}

#: Registered models: name -> hyperparameters (see the module docstring).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # MTMamba (ECCV 2024): 2 STM + 1 CTM per stage, Swin-L encoder.
    "mtmamba_swin_large_nyud": {**_SWIN_L, "decoder": "mtmamba", "dataset": "nyud"},
    "mtmamba_swin_large_pascal": {**_SWIN_L, "decoder": "mtmamba", "dataset": "pascal"},
    # MTMamba++: 2 STM + 1 S-CTM per stage, conv heads.
    "mtmamba_pp_swin_large_nyud": {**_SWIN_L, "decoder": "mtmamba_pp", "dataset": "nyud", "cross": "sctm"},
    "mtmamba_pp_swin_large_pascal": {**_SWIN_L, "decoder": "mtmamba_pp", "dataset": "pascal", "cross": "sctm"},
    "mtmamba_pp_swin_large_cityscapes": {
        **_SWIN_L,
        "decoder": "mtmamba_pp",
        "dataset": "cityscapes",
        "cross": "sctm",
    },
    # Tiny variants for tests and CPU runs.
    "mtmamba_tiny": {**_TINY, "decoder": "mtmamba"},
    "mtmamba_pp_tiny": {**_TINY, "decoder": "mtmamba_pp", "cross": "sctm"},
    # MSM: MTMamba's decoder with Multi-Scale Scan, scales {1, 4} in all three MFR stages.
    "msm_swin_large_nyud": {**_SWIN_L, "decoder": "msm", "dataset": "nyud", "scales": "1-4"},
    "msm_swin_large_pascal": {**_SWIN_L, "decoder": "msm", "dataset": "pascal", "scales": "1-4"},
    "msm_tiny": {**_TINY, "decoder": "msm", "scales": "1-4"},
    # PAMM: ViT-L/16 encoder, 4 PAME blocks, official NYUD / PASCAL-Context settings.
    "pamm_vit_large_nyud": {
        "encoder": "vit_large", "decoder": "pamm", "dataset": "nyud", "dim": 768, "d_state": 16,
        "num_experts": 15, "expert_rank": 4, "top_k": 9, "task_rank": 4, "softmax_before_topk": False,
    },
    "pamm_vit_large_pascal": {
        "encoder": "vit_large", "decoder": "pamm", "dataset": "pascal", "dim": 1024, "d_state": 64,
        "num_experts": 15, "expert_rank": 4, "top_k": 9, "task_rank": 4, "softmax_before_topk": True,
    },
    "pamm_tiny": {
        "encoder": "cnn_tiny", "encoder_kwargs": {"channels": (16, 32, 64, 128)}, "decoder": "pamm",
        "dataset": "nyud", "dim": 32, "d_state": 4, "num_experts": 4, "expert_rank": 2, "top_k": 2,
        "task_rank": 2, "upsample": 1,
    },
}

_MODEL_KEYS = ("encoder", "encoder_kwargs", "decoder", "dataset", "tasks")


def register_model(name: str, config: Mapping[str, Any], overwrite: bool = False) -> None:
    """Add ``config`` (hyperparameters only) under ``name``; ``overwrite`` to replace an entry."""
    if name in MODEL_CONFIGS and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    for key in ("encoder", "decoder"):
        if key not in config:
            raise ValueError(f"model config {name!r} needs the key {key!r}")
    if config["decoder"] not in DECODERS:
        raise ValueError(
            f"model config {name!r}: unknown decoder {config['decoder']!r}; expected one of {sorted(DECODERS)}"
        )
    MODEL_CONFIGS[name] = dict(config)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell pattern (``"*_tiny"``)."""
    names = sorted(MODEL_CONFIGS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def model_config(name: str) -> dict[str, Any]:
    """A copy of the hyperparameters registered under ``name``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; see mtssm.nn.list_models() for the {len(MODEL_CONFIGS)} registered names")
    return copy.deepcopy(MODEL_CONFIGS[name])


def create_model(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> MultiTaskModel:
    """Build the registered model ``name``, with ``overrides`` replacing its hyperparameters.

    ``device``/``dtype`` go to every module; ``create_model(name, device="meta")`` builds the
    model without memory (e.g. to count parameters).
    """
    cfg = model_config(name)
    cfg.update(overrides)
    from mtssm.nn.encoders import create_encoder  # the encoders import heavy weight-mapping code

    decoder_type = cfg.pop("decoder")
    if decoder_type not in DECODERS:
        raise ValueError(f"{name}: unknown decoder {decoder_type!r}; expected one of {sorted(DECODERS)}")
    tasks = resolve_tasks(cfg.pop("tasks", None), cfg.pop("dataset", "nyud"))
    fk = {"device": device, "dtype": dtype}
    encoder = create_encoder(cfg.pop("encoder"), **{**fk, **cfg.pop("encoder_kwargs", {})})
    channels: Sequence[int] = feature_channels(encoder)
    try:
        decoder, heads = DECODERS[decoder_type](channels, tasks, **fk, **cfg)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(f"create_model({name!r}): {e}") from None  # an unknown hyperparameter
    return MultiTaskModel(encoder, decoder, heads, tasks)
