"""Small building blocks shared by the decoders: stochastic depth, norms and patch expansion.

Decoder features are channels-last ``(B, H, W, C)`` unless a docstring says otherwise; encoder
features and model outputs are channels-first ``(B, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DropPath",
    "FinalPatchExpand4x",
    "LayerNorm2d",
    "PatchExpand",
    "drop_path",
    "drop_path_rates",
    "pixel_shuffle_last",
]


def drop_path(x: Tensor, p: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth: zero whole samples of the residual branch ``x`` (B, ...) with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if scale_by_keep:
        mask = mask / keep
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth per sample (for the residual branch of a block)."""

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, n: int) -> list[float]:
    """``n`` stochastic-depth rates decreasing linearly from ``rate`` to 0 (the decoders' schedule)."""
    if n == 1:
        return [float(rate)]
    return [rate * (1.0 - i / (n - 1)) for i in range(n)]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map ``(B, C, H, W)``."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def pixel_shuffle_last(x: Tensor, scale: int) -> Tensor:
    """Channels-last pixel shuffle: ``(B, H, W, s*s*C) -> (B, s*H, s*W, C)``.

    The channel index is read as ``(p1, p2, c)`` with ``p1`` the row offset and ``p2`` the column
    offset inside each ``s x s`` cell (einops ``b h w (p1 p2 c) -> b (h p1) (w p2) c``).
    """
    b, h, w, c = x.shape
    c_out = c // (scale * scale)
    x = x.reshape(b, h, w, scale, scale, c_out).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale, w * scale, c_out)


class PatchExpand(nn.Module):
    """2x upsampling of a channels-last map: Linear C->2C, 2x2 pixel shuffle to C/2, LayerNorm.

    ``(B, H, W, C) -> (B, 2H, 2W, C/2)``.
    """

    def __init__(
        self,
        dim: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"PatchExpand dim must be even, got {dim}")
        self.dim = dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.norm = norm_layer(dim // 2, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(pixel_shuffle_last(self.expand(x), 2))


class FinalPatchExpand4x(nn.Module):
    """4x upsampling of a channels-last map: Linear C->16C, 4x4 pixel shuffle to C, LayerNorm.

    ``(B, H, W, C) -> (B, 4H, 4W, C)``.
    """

    def __init__(
        self,
        dim: int,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 16 * dim, bias=False, device=device, dtype=dtype)
        self.norm = norm_layer(dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(pixel_shuffle_last(self.expand(x), 4))
