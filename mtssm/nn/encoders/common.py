"""What every encoder promises: four feature maps and their (channels, stride) contract."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Encoder", "FeatureInfo", "Mlp", "check_images", "init_transformer_weights"]


class FeatureInfo(NamedTuple):
    """One output level of an encoder; a named ``(channels, stride)`` pair.

    Attributes:
        channels: C_i, the channel count of the map.
        stride: s_i, the map of an input (B, 3, H, W) has shape (B, C_i, ceil(H/s_i), ceil(W/s_i)).
    """

    channels: int
    stride: int


class Encoder(nn.Module):
    """Base class of the mtssm encoders.

    ``forward(x)`` takes images ``x: (B, in_chans, H, W)`` of any H, W and returns a list of four
    channels-first maps, level i of shape ``(B, C_i, ceil(H / s_i), ceil(W / s_i))`` where
    ``(C_i, s_i) = feature_info[i]``. Decoders read the contract from ``feature_info`` (or the
    ``channels`` / ``strides`` shortcuts) instead of hard-coding it.
    """

    feature_info: list[FeatureInfo]

    @property
    def channels(self) -> list[int]:
        """Channel count of each output level."""
        return [f.channels for f in self.feature_info]

    @property
    def strides(self) -> list[int]:
        """Stride (input pixels per output pixel) of each output level."""
        return [f.stride for f in self.feature_info]

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def check_images(x: Tensor, in_chans: int, name: str) -> None:
    """One-line error unless ``x`` is a (B, in_chans, H, W) batch of images."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")


class Mlp(nn.Module):
    """Transformer feed-forward ``fc2(drop(act(fc1(x))))`` over the last dim: (..., C) -> (..., C_out)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, device=device, dtype=dtype)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights with zero biases, unit LayerNorms (Swin/ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def increasing_rates(rate: float, n: int) -> list[float]:
    """``n`` stochastic-depth rates increasing linearly from 0 to ``rate`` (the encoders' schedule).

    Plain Python, so models can be built on the meta device (no tensor is created)."""
    if n <= 1:
        return [0.0] * n
    return [rate * i / (n - 1) for i in range(n)]
