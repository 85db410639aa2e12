"""Model registry: named hyperparameter sets, and the decoder builders that turn them into models.

Each entry of :data:`MODEL_CONFIGS` is ONLY hyperparameters (no weights, no preprocessing):

- ``encoder``: a name for :func:`mtssm.nn.encoders.create_encoder`; ``encoder_kwargs``: its overrides.
- ``decoder``: a key of :data:`DECODERS`.
- ``dataset`` (``nyud``, ``pascal``, ``cityscapes``) and optionally ``tasks`` (default: the dataset's).
- everything else goes to the decoder builder (channels, depths, drop path, SSM settings, ...).

Names read ``<method>_<encoder>_<dataset>``; ``<method>_tiny`` uses the small CNN encoder and the NYUD
tasks, for tests and CPU runs. A builder is ``builder(encoder_channels, tasks, **hparams) ->
(decoder, heads)`` with ``tasks`` the ``{task: C_t}`` map of :func:`mtssm.nn.tasks.resolve_tasks`.

The paper models' entries hold the official values, each with the official file and line in a
comment. What they start from (pretrained encoder file, official trained checkpoint, input
statistics) is metadata kept apart, in :mod:`mtssm.nn.pretrained`; :func:`create_model` loads weights
files given to it (``weights=``, ``encoder_weights=``), timm-style.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtssm.nn.model import MultiTaskModel, feature_channels
from mtssm.nn.mtmamba import build_mtmamba
from mtssm.nn.mtmamba_pp import build_mtmamba_pp
from mtssm.nn.msm import build_msm
from mtssm.nn.pamm import build_pamm
from mtssm.nn.pretrained import default_normalization, paper_weights, recorded_normalization
from mtssm.nn.tasks import resolve_tasks
from mtssm.nn.weights import WeightsReport, load_encoder_weights, load_model_weights

__all__ = [
    "DECODERS",
    "MODEL_CONFIGS",
    "create_model",
    "list_models",
    "load_weights",
    "model_config",
    "register_model",
]

DecoderBuilder = Callable[..., tuple[nn.Module, nn.ModuleDict]]

#: Decoder type name -> builder ``(encoder_channels, tasks, **hparams) -> (decoder, heads)``.
DECODERS: dict[str, DecoderBuilder] = {
    "mtmamba": build_mtmamba,
    "mtmamba_pp": build_mtmamba_pp,
    "msm": build_msm,
    "pamm": build_pamm,
}

# Swin-L as MTMamba's code builds it (EnVision-Research/MTMamba utils/common_config.py:15-17):
# mmseg's SwinTransformer with its default stochastic depth, drop_path_rate=0.1 (mmseg 1.2.2
# mmseg/models/backbones/swin.py, SwinTransformer.__init__). Decoder drop path 0.2 falling to 0
# (models/MTMamba.py and models/MTMamba_plus.py:270, torch.linspace(0.2, 0, ...)).
_SWIN_L = {
    "encoder": "swin_large",
    "encoder_kwargs": {"drop_path_rate": 0.1},
    "drop_path_rate": 0.2,
    "depths": (2, 2, 2),
}
# MTMamba++'s heads (models/MTMamba_plus.py:298-305): Conv3x3 to a hard-coded 96 channels,
# SyncBatchNorm(96), ReLU, Conv1x1.
_PP_HEADS = {"cross": "sctm", "head_hidden": 96, "head_norm": "syncbatchnorm"}
# PAMM as CQC-gogopro/PAMM builds it: ViT-L/16 with drop_path_rate=0.15 (utils/common_config.py:22);
# 15 experts of rank 4 for B and C (models/transformers/MoE_mamba.py:137,141; PAME.py:130), the task
# path's rank the first expert rank, 4 (MoE_mamba.py:523-525); top 9, MoE's default topk
# (MoE_mamba.py:494: the B / C MoEs never pass it); softmax over all experts, the 6 smallest
# zeroed, no renormalisation, on both datasets (MoE_mamba.py:550-556: the configs' pre_softmax is
# read only by PAME.py's unused MOEBlock, PAME.py:258); 9x9 expert convolutions: the configs'
# topk: 9 (configs/nyu_PAME.yml:62, configs/pascal_PAME.yml:64) reaches MoE as its `kernal`
# (MoE_mamba.py:137,141 pass it positionally; see mtssm.nn.pamm.PAMEBlock). The rest of mtssm.nn.pamm's defaults are the
# official code's: the scan reads SiLU(GN(x)), cropped power-of-two Hilbert orders (Scan: h,
# configs/nyu_PAME.yml:53), fixed A, D and priors, and routers pooling with Linear(H*W, 1) over
# the ViT's token grid at the training crop (utils/common_config.py:22 builds the ViT at
# img_size=p.TRAIN.SCALE; H, W = 28, 36 at configs/nyu_PAME.yml:13-14). Its ViT has no class
# token (PAME.py:151 adds pos_embed[:, 1:] to the patches only).
_PAMM = {
    "decoder": "pamm",
    "num_experts": 15,
    "expert_rank": 4,
    "top_k": 9,
    "task_rank": 4,
    "expert_kernel_size": 9,
    "softmax_before_topk": True,
}


def _pamm_vit(crop: tuple[int, int]) -> dict[str, Any]:
    """PAMM's ViT-L/16 built for its training crop (H, W) and the routers' token grid."""
    return {
        "encoder": "vit_large",
        "encoder_kwargs": {"drop_path_rate": 0.15, "img_size": crop, "class_token": False},
        "router_grid": (crop[0] // 16, crop[1] // 16),
    }


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
    "mtmamba_pp_swin_large_nyud": {**_SWIN_L, **_PP_HEADS, "decoder": "mtmamba_pp", "dataset": "nyud"},
    "mtmamba_pp_swin_large_pascal": {**_SWIN_L, **_PP_HEADS, "decoder": "mtmamba_pp", "dataset": "pascal"},
    "mtmamba_pp_swin_large_cityscapes": {
        **_SWIN_L,
        **_PP_HEADS,
        "decoder": "mtmamba_pp",
        "dataset": "cityscapes",
    },
    # Tiny variants for tests and CPU runs.
    "mtmamba_tiny": {**_TINY, "decoder": "mtmamba"},
    "mtmamba_pp_tiny": {**_TINY, "decoder": "mtmamba_pp", "cross": "sctm"},
    # MSM: MTMamba's decoder with Multi-Scale Scan, scales {1, 4} in all three MFR stages.
    "msm_swin_large_nyud": {**_SWIN_L, "decoder": "msm", "dataset": "nyud", "scales": "1-4"},
    "msm_swin_large_pascal": {**_SWIN_L, "decoder": "msm", "dataset": "pascal", "scales": "1-4"},
    "msm_tiny": {**_TINY, "decoder": "msm", "scales": "1-4"},
    # PAMM: ViT-L/16 encoder, 4 PAME blocks. Width and state size per dataset:
    # configs/nyu_PAME.yml:58,64 (768, 16) and configs/pascal_PAME.yml:59,66 (1024, 64).
    "pamm_vit_large_nyud": {**_PAMM, **_pamm_vit((448, 576)), "dataset": "nyud", "dim": 768, "d_state": 16},
    "pamm_vit_large_pascal": {**_PAMM, **_pamm_vit((512, 512)), "dataset": "pascal", "dim": 1024, "d_state": 64},
    # at any input size: attention-pooling routers (mtssm.nn.experts.TaskRouter)
    "pamm_tiny": {
        "encoder": "cnn_tiny", "encoder_kwargs": {"channels": (16, 32, 64, 128)}, "decoder": "pamm",
        "dataset": "nyud", "dim": 32, "d_state": 4, "num_experts": 4, "expert_rank": 2, "top_k": 2,
        "task_rank": 2, "expert_kernel_size": 3, "upsample": 1, "router_pool": "attention",
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


WeightsPath = str | Path | None


def _given(path: WeightsPath) -> bool:
    """A weights path was given (``None`` and ``"none"`` mean none)."""
    return path is not None and str(path).strip().lower() not in ("", "none")


def create_model(
    name: str,
    *,
    weights: WeightsPath = None,
    encoder_weights: WeightsPath = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    echo: Callable[[str], None] | None = print,
    **overrides: Any,
) -> MultiTaskModel:
    """Build the registered model ``name``, with ``overrides`` replacing its hyperparameters.

    ``device``/``dtype`` go to every module; ``create_model(name, device="meta")`` builds the
    model without memory (e.g. to count parameters).

    Weights, timm-style (each load's :class:`WeightsReport` is passed to ``echo`` as one line and
    kept in ``model.weights_reports``; a file whose keys do not fit raises a one-line ``ValueError``):

    - ``encoder_weights``: a pretrained encoder file (official Swin, timm, ...) loaded into
      ``model.encoder``;
    - ``weights``: the whole model (an mtssm checkpoint, or an official trained checkpoint), loaded
      after ``encoder_weights``.

    ``None`` or ``"none"`` load nothing. The model's input normalisation
    (:attr:`MultiTaskModel.input_normalization`) is the official pipeline's for a paper model
    (:mod:`mtssm.nn.pretrained`), else its encoder's; statistics recorded in a weights file replace
    it (for a paper model only those of whole-model ``weights``).
    """
    cfg = model_config(name)
    cfg.update(overrides)
    from mtssm.nn.encoders import create_encoder  # the encoders import heavy weight-mapping code

    decoder_type = cfg.pop("decoder")
    if decoder_type not in DECODERS:
        raise ValueError(f"{name}: unknown decoder {decoder_type!r}; expected one of {sorted(DECODERS)}")
    tasks = resolve_tasks(cfg.pop("tasks", None), cfg.pop("dataset", "nyud"))
    fk = {"device": device, "dtype": dtype}
    encoder_name = cfg.pop("encoder")
    encoder = create_encoder(encoder_name, **{**fk, **cfg.pop("encoder_kwargs", {})})
    channels: Sequence[int] = feature_channels(encoder)
    try:
        decoder, heads = DECODERS[decoder_type](channels, tasks, **fk, **cfg)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(f"create_model({name!r}): {e}") from None  # an unknown hyperparameter
    model = MultiTaskModel(encoder, decoder, heads, tasks, normalization=default_normalization(name, encoder_name))
    model.weights_reports = load_weights(  # type: ignore[assignment]
        model, weights=weights, encoder_weights=encoder_weights, echo=echo,
        keep_normalization=paper_weights(name) is not None,
    )
    return model


def load_weights(
    model: MultiTaskModel,
    *,
    weights: WeightsPath = None,
    encoder_weights: WeightsPath = None,
    echo: Callable[[str], None] | None = print,
    keep_normalization: bool = False,
) -> list[WeightsReport]:
    """Load ``encoder_weights`` into ``model.encoder``, then whole-model ``weights`` into ``model``.

    Returns the reports (each also passed to ``echo`` as one line). A file whose keys do not fit
    raises a one-line ``ValueError``. Input statistics a file records (an mtssm checkpoint's
    metadata, or what its layout implies) become the model's, except an encoder file's when
    ``keep_normalization`` (a paper model keeps its official pipeline's). An mtssm checkpoint is
    given as its ``model.safetensors`` file.
    """
    reports: list[WeightsReport] = []
    for what, path in (("encoder weights", encoder_weights), ("weights", weights)):
        if not _given(path):
            continue
        if what == "weights":
            report = load_model_weights(model, path)
        else:
            report = load_encoder_weights(model.encoder, path)
        if echo is not None:
            echo(f"{what}: {report.summary()}")
        if not report.ok:
            raise ValueError(f"{what} {path} do not fit the model: {report.summary()}")
        stats = recorded_normalization(path) if what == "weights" else None  # an mtssm checkpoint's
        if stats is None and report.mean is not None and report.std is not None:
            stats = (report.mean, report.std)
        if stats is not None and not (what != "weights" and keep_normalization):
            model.set_input_normalization(*stats)
        reports.append(report)
    return reports
