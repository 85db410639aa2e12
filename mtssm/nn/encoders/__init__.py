"""Image encoders with a documented four-level contract and their registry.

Every encoder maps images (B, 3, H, W) of any size to a list of four channels-first maps; level i
is (B, C_i, ceil(H / s_i), ceil(W / s_i)) with ``(C_i, s_i) = encoder.feature_info[i]``
(:class:`FeatureInfo`).

>>> enc = create_encoder("swin_large")            # Swin-L/4, window 12: C = 192, 384, 768, 1536
>>> from mtssm.nn.weights import load_encoder_weights
>>> load_encoder_weights(enc, "swin_large_patch4_window12_384_22kto1k.pth")  # doctest: +SKIP
>>> [f.stride for f in enc.feature_info]
[4, 8, 16, 32]

Registry entries are only hyperparameters; ``family`` picks the class. Checkpoint and
preprocessing notes live apart, in :data:`ENCODER_WEIGHTS`.
"""

from __future__ import annotations

import copy
from typing import Any

from mtssm.nn.encoders.cnn import CNNEncoder
from mtssm.nn.encoders.common import Encoder, FeatureInfo
from mtssm.nn.encoders.swin import SwinEncoder
from mtssm.nn.encoders.vit import ViTEncoder

__all__ = [
    "CNNEncoder",
    "ENCODER_WEIGHTS",
    "Encoder",
    "FeatureInfo",
    "SwinEncoder",
    "ViTEncoder",
    "create_encoder",
    "encoder_config",
    "list_encoders",
]

_FAMILIES: dict[str, type[Encoder]] = {"swin": SwinEncoder, "vit": ViTEncoder, "cnn": CNNEncoder}

# Hyperparameters only. Swin drop path rates are those of the official dense-prediction configs.
_ENCODERS: dict[str, dict[str, Any]] = {
    "swin_tiny": dict(
        family="swin",
        patch_size=4,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        drop_path_rate=0.2,
    ),
    "swin_small": dict(
        family="swin",
        patch_size=4,
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        drop_path_rate=0.3,
    ),
    "swin_base": dict(
        family="swin",
        patch_size=4,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=12,
        drop_path_rate=0.3,
    ),
    "swin_large": dict(
        family="swin",
        patch_size=4,
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=12,
        drop_path_rate=0.3,
    ),
    "vit_small": dict(family="vit", img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(family="vit", img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(family="vit", img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "cnn_tiny": dict(family="cnn", channels=(32, 64, 128, 256), depths=(1, 1, 1, 1)),
}

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

#: Which released checkpoints fit each entry (load them with :func:`mtssm.nn.weights.load_encoder_weights`) and the
#: input normalisation they were trained with. Metadata only; nothing is downloaded.
ENCODER_WEIGHTS: dict[str, dict[str, Any]] = {
    "swin_tiny": dict(
        checkpoints=("swin_tiny_patch4_window7_224.pth", "timm swin_tiny_patch4_window7_224"), **_IMAGENET
    ),
    "swin_small": dict(
        checkpoints=("swin_small_patch4_window7_224.pth", "timm swin_small_patch4_window7_224"), **_IMAGENET
    ),
    "swin_base": dict(
        checkpoints=("swin_base_patch4_window12_384_22k.pth", "timm swin_base_patch4_window12_384"), **_IMAGENET
    ),
    "swin_large": dict(
        checkpoints=(
            "swin_large_patch4_window12_384_22kto1k.pth",  # what MTMamba, MTMamba++ and MSM start from
            "swin_large_patch4_window12_384_22k.pth",
            "timm swin_large_patch4_window12_384",
        ),
        **_IMAGENET,
    ),
    "vit_small": dict(checkpoints=("timm vit_small_patch16_384.augreg_in21k_ft_in1k",), **_INCEPTION),
    "vit_base": dict(checkpoints=("timm vit_base_patch16_384.augreg_in21k_ft_in1k",), **_INCEPTION),
    "vit_large": dict(checkpoints=("timm vit_large_patch16_384.augreg_in21k_ft_in1k",), **_INCEPTION),
    "cnn_tiny": dict(checkpoints=(), **_IMAGENET),
}


def list_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder`, sorted."""
    return sorted(_ENCODERS)


def encoder_config(name: str) -> dict[str, Any]:
    """A copy of the registered hyperparameters of ``name`` (including its ``family``)."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(list_encoders())}")
    return copy.deepcopy(_ENCODERS[name])


def create_encoder(name: str, **overrides: Any) -> Encoder:
    """Build the registered encoder ``name``, with ``overrides`` replacing its hyperparameters.

    >>> enc = create_encoder("swin_tiny", embed_dim=24, depths=(1, 1, 1, 1))
    >>> enc.channels
    [24, 48, 96, 192]
    """
    config = encoder_config(name)
    if "family" in overrides:
        raise ValueError(f"create_encoder: 'family' cannot be overridden (encoder {name!r} is {config['family']!r})")
    family = config.pop("family")
    config.update(overrides)
    return _FAMILIES[family](**config)
