"""A small convolutional encoder with the four-level (strides 4, 8, 16, 32) contract, for fast CPU
runs and tests of the decoders.

Stem: two 3x3 stride-2 convs (stride 4). Each later stage starts with a 3x3 stride-2 conv. Every
stage then runs ``depth`` residual blocks (depthwise 3x3, norm, 1x1 expand, GELU, 1x1 project).
Norms are GroupNorm with one group (a LayerNorm over C, H, W), so batches of one and 1x1 maps work
in training mode. Stride-2 convs with padding 1 give ceil(H/2) for every H, hence level i has
spatial size ceil(H / 2**(i+2)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mtssm.nn.encoders.common import Encoder, FeatureInfo, check_images, increasing_rates
from mtssm.nn.layers import DropPath

__all__ = ["CNNEncoder", "ConvBlock", "group_norm"]


def group_norm(channels: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """GroupNorm with a single group over ``channels`` (the encoder's default norm)."""
    return nn.GroupNorm(1, channels, device=device, dtype=dtype)


class ConvBlock(nn.Module):
    """Residual block on (B, C, H, W): x + DropPath(pw2(act(pw1(norm(dw(x))))))."""

    def __init__(
        self,
        dim: int,
        expand: int = 2,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = group_norm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, device=device, dtype=dtype)
        self.norm = norm_layer(dim, device=device, dtype=dtype)
        self.pw1 = nn.Conv2d(dim, expand * dim, 1, device=device, dtype=dtype)
        self.act = act_layer()
        self.pw2 = nn.Conv2d(expand * dim, dim, 1, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.pw2(self.act(self.pw1(self.norm(self.dw(x))))))


def _down(cin: int, cout: int, norm_layer, act: nn.Module | None, device, dtype) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, device=device, dtype=dtype),
        norm_layer(cout, device=device, dtype=dtype),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class CNNEncoder(Encoder):
    """Small CNN giving four channels-first maps at strides 4, 8, 16, 32.

    Args:
        in_chans: input image channels.
        channels: C_i of the four levels.
        depths: residual blocks per level.
        expand: hidden width factor of the blocks' 1x1 convs.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        act_layer, norm_layer: activation type and a ``norm_layer(C, device=, dtype=)`` factory.

    ``forward(x)``: x (B, in_chans, H, W) -> 4 maps (B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))).
    """

    def __init__(
        self,
        in_chans: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        expand: int = 2,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = group_norm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels, depths = tuple(channels), tuple(depths)
        if len(channels) != 4 or len(depths) != 4:
            raise ValueError(f"CNNEncoder: channels and depths need 4 entries, got {channels} and {depths}")
        self.in_chans = in_chans
        self.feature_info = [FeatureInfo(channels[i], 2 ** (i + 2)) for i in range(4)]
        half = max(channels[0] // 2, 1)
        self.stem = nn.Sequential(
            _down(in_chans, half, norm_layer, act_layer(), device, dtype),
            _down(half, channels[0], norm_layer, act_layer(), device, dtype),
        )
        rates = increasing_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(depths[:i])
            down = _down(channels[i - 1], channels[i], norm_layer, None, device, dtype) if i > 0 else nn.Identity()
            blocks = [
                ConvBlock(channels[i], expand, rates[start + j], act_layer, norm_layer, device=device, dtype=dtype)
                for j in range(depths[i])
            ]
            self.stages.append(nn.Sequential(down, *blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        check_images(x, self.in_chans, "CNNEncoder")
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
