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
    "resize_bilinear",
    "upsample_bilinear_phases",
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


def _upsample_axis(x: Tensor, scale: int, dim: int) -> Tensor:
    """Bilinear (half-pixel centres) upsampling of axis ``dim`` by the integer ``scale``.

    Output ``i = scale*q + r`` reads the source position ``q + f_r`` with ``f_r = (r + 0.5)/scale -
    0.5`` in ``(-0.5, 0.5)``: ``(1 - |f_r|) x[q] + |f_r| x[q ± 1]``, with the border replicated
    (which is ``F.interpolate``'s clamping of the source index).
    """
    n = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim)
    left, right = padded.narrow(dim, 0, n), padded.narrow(dim, 2, n)
    phases = []
    for r in range(scale):
        f = (r + 0.5) / scale - 0.5
        phases.append(x if f == 0 else x * (1 - abs(f)) + (right if f > 0 else left) * abs(f))
    return torch.stack(phases, dim + 1).flatten(dim, dim + 1)


def upsample_bilinear_phases(x: Tensor, scale: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)`` for integer
    scales, written as ``scale`` phase-wise blends of shifted copies: ``(B, C, h, w) -> (B, C,
    s_h*h, s_w*w)``.

    The same values (to rounding), but its backward is made of gathers, which Inductor fuses into
    one loop, where the backward of its own bilinear decomposition is a scatter-add that runs
    several times slower than ATen's kernel on CPU.
    """
    sh, sw = scale
    if sw > 1:
        x = _upsample_axis(x, sw, x.ndim - 1)
    if sh > 1:
        x = _upsample_axis(x, sh, x.ndim - 2)
    return x


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of ``(B, C, h, w)`` to ``(B, C, H, W)``.

    Eager mode calls ``F.interpolate``; under ``torch.compile`` / ``torch.export`` an integer
    upscale runs as :func:`upsample_bilinear_phases` (same values, a faster compiled backward).
    """
    h, w = x.shape[-2], x.shape[-1]
    H, W = size
    if (h, w) == (H, W):
        return x
    if torch.compiler.is_compiling() and H % h == 0 and W % w == 0:
        return upsample_bilinear_phases(x, (H // h, W // w))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
