"""What the papers start from: pretrained encoder files, official trained checkpoints, input statistics.

Metadata only, kept apart from the hyperparameters of :data:`mtssm.nn.registry.MODEL_CONFIGS`;
nothing is downloaded. :data:`PAPER_WEIGHTS` names, for each registered paper model, the encoder
weights file its paper's code loads (the name as published), the official trained checkpoint that
loads into it, the official config it follows, and the input normalisation the official data
pipeline applies. A model listed here is a *paper model*: a recipe that trains it must give its
encoder weights (or ask for training from scratch with ``model.encoder_weights: none``).

:func:`default_normalization` gives a model's input statistics when no weights file says
otherwise: the paper pipeline's for a paper model, else its encoder's (``ENCODER_WEIGHTS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IMAGENET_STATS",
    "INCEPTION_STATS",
    "NORMALIZATION_KEY",
    "PAPER_WEIGHTS",
    "Normalization",
    "PaperWeights",
    "default_normalization",
    "paper_weights",
]

#: ``(mean, std)`` per RGB channel, for images scaled to [0, 1].
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]

#: The safetensors metadata key under which an mtssm checkpoint records its model's input
#: statistics, as JSON ``{"mean": [...], "std": [...]}``.
NORMALIZATION_KEY = "mtssm_input_normalization"

IMAGENET_STATS: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_STATS: Normalization = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# The Swin-L file MTMamba's code converts and loads (pretrained_ckpts/run.sh:1-2 downloads it and
# runs swin2mmseg.py on it; utils/common_config.py:15-17 loads the converted
# mmseg_swin_large_patch4_window12_384_22kto1k.pth). MSM builds on MTMamba's code and encoder.
_SWIN_L_FILE = "swin_large_patch4_window12_384_22kto1k.pth"
_SWIN_L_SOURCE = (
    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/" + _SWIN_L_FILE
    + " (EnVision-Research/MTMamba pretrained_ckpts/run.sh:1); its mmseg conversion "
    "(pretrained_ckpts/swin2mmseg.py) loads too"
)
# PAMM's ViT-L/16: timm 0.5.4's vit_large_patch16_384, Google's AugReg .npz
# (CQC-gogopro/PAMM models/transformers/PAME.py:367-370, loaded with pretrained=True at
# utils/common_config.py:22).
_VIT_L_FILE = "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz"
_VIT_L_SOURCE = "https://storage.googleapis.com/vit_models/augreg/" + _VIT_L_FILE + " (PAMM PAME.py:367-370)"


@dataclass(frozen=True)
class PaperWeights:
    """What a paper model starts from and where its numbers come from.

    Attributes:
        encoder_file: the pretrained encoder file the official code loads, named as published.
        encoder_source: where that file is published (and which official line loads it).
        official_config: the official config file the paper recipe follows.
        official_checkpoint: the official trained checkpoint that loads into this model (None when
            the authors published none).
        normalization: ``(mean, std)`` the official data pipeline normalises images with.
        normalization_source: the official line that sets it.
    """

    encoder_file: str
    encoder_source: str
    official_config: str
    official_checkpoint: str | None
    normalization: Normalization
    normalization_source: str


def _mtmamba(config: str, checkpoint: str | None) -> PaperWeights:
    return PaperWeights(
        _SWIN_L_FILE, _SWIN_L_SOURCE, f"EnVision-Research/MTMamba {config}", checkpoint, IMAGENET_STATS,
        "EnVision-Research/MTMamba utils/common_config.py:56,64",
    )


def _msm() -> PaperWeights:
    return PaperWeights(
        _SWIN_L_FILE, _SWIN_L_SOURCE, "MSM paper Sec. 4.1 (no public code)", None, IMAGENET_STATS,
        "MTMamba's pipeline, EnVision-Research/MTMamba utils/common_config.py:56,64",
    )


def _pamm(config: str) -> PaperWeights:
    # The official pipeline normalises with ImageNet statistics although the ViT weights were
    # trained with Inception ones (0.5, 0.5; PAME.py:310): the paper model keeps the pipeline's.
    return PaperWeights(
        _VIT_L_FILE, _VIT_L_SOURCE, f"CQC-gogopro/PAMM {config}", None, IMAGENET_STATS,
        "CQC-gogopro/PAMM utils/common_config.py:80",
    )


#: Registered paper model -> :class:`PaperWeights`.
PAPER_WEIGHTS: dict[str, PaperWeights] = {
    "mtmamba_swin_large_nyud": _mtmamba("configs/mtmamba_nyud.yml", "mtmamba_nyud.pth.tar"),
    "mtmamba_swin_large_pascal": _mtmamba("configs/mtmamba_pascal.yml", "mtmamba_pascal.pth.tar"),
    "mtmamba_pp_swin_large_nyud": _mtmamba("configs/mtmamba_plus_nyud.yml", "mtmamba_plus_nyud.pth.tar"),
    "mtmamba_pp_swin_large_pascal": _mtmamba("configs/mtmamba_plus_pascal.yml", "mtmamba_plus_pascal.pth.tar"),
    "mtmamba_pp_swin_large_cityscapes": _mtmamba(
        "configs/mtmamba_plus_cityscapes.yml", "mtmamba_plus_cityscapes.pth.tar"
    ),
    # MSM publishes no code; its paper (Sec. 4.1) starts from MTMamba's Swin-L and pipeline.
    "msm_swin_large_nyud": _msm(),
    "msm_swin_large_pascal": _msm(),
    "pamm_vit_large_nyud": _pamm("configs/nyu_PAME.yml"),
    "pamm_vit_large_pascal": _pamm("configs/pascal_PAME.yml"),
}


def paper_weights(name: str) -> PaperWeights | None:
    """The :class:`PaperWeights` of registered model ``name``, or None when it is not a paper model."""
    return PAPER_WEIGHTS.get(name)


def default_normalization(model_name: str, encoder_name: str) -> Normalization:
    """Input ``(mean, std)`` of a model before any weights file is read: the official pipeline's for
    a paper model, else the statistics its encoder's released weights were trained with."""
    paper = PAPER_WEIGHTS.get(model_name)
    if paper is not None:
        return paper.normalization
    from mtssm.nn.encoders import ENCODER_WEIGHTS

    meta = ENCODER_WEIGHTS.get(encoder_name, {})
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])  # type: ignore[return-value]
    return IMAGENET_STATS


def normalization_metadata(stats: Normalization) -> str:
    """``stats`` as the JSON stored under :data:`NORMALIZATION_KEY`."""
    import json

    return json.dumps({"mean": list(stats[0]), "std": list(stats[1])})


def recorded_normalization(path: str | Path) -> Normalization | None:
    """The input statistics a ``.safetensors`` weights file records under :data:`NORMALIZATION_KEY`
    (an mtssm checkpoint's ``model.safetensors``), or None (another file, or none recorded)."""
    import json

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        data = json.loads(meta[NORMALIZATION_KEY]) if NORMALIZATION_KEY in meta else None
    except Exception:  # an unreadable file is the weights loader's to report
        return None
    if not isinstance(data, dict):
        return None
    return tuple(data["mean"]), tuple(data["std"])  # type: ignore[return-value]
