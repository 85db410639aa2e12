"""Task heads: a task's decoder feature ``(B, C, h, w)`` -> its predictions ``(B, C_t, h', w')``.

The model resizes every head's output to the input size (bilinear), so a head may stop at its own
resolution (``ConvHead`` stays at the feature's stride, ``ExpandHead`` upsamples 4x first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtssm.nn.layers import FinalPatchExpand4x

__all__ = ["BATCH_NORMS", "ConvHead", "ExpandHead", "LinearHead"]

#: Batch-norm layers a model argument may name (``head_norm="syncbatchnorm"``). ``SyncBatchNorm``
#: is plain batch norm outside a distributed run and synchronises its statistics across the
#: processes of one (CUDA only).
BATCH_NORMS: dict[str, type[nn.Module]] = {"batchnorm": nn.BatchNorm2d, "syncbatchnorm": nn.SyncBatchNorm}


class ExpandHead(nn.Module):
    """MTMamba's head: FinalPatchExpand4x (4x up, LN) then a 1x1 conv to the task's channels.

    ``(B, C, h, w) -> (B, C_t, 4h, 4w)``.

    Computed in the cheaper, equal order: expand and LayerNorm per pixel of the ``(h, w)`` grid,
    one shuffle of the ``C`` normalised channels into the ``(4h, 4w)`` map (channels-last), then the
    1x1 projection as one matrix product that writes the ``C_t`` channels-first output directly, so
    no ``C_t``-channel tensor is ever transposed (forward or backward). The norm is per pixel, so it
    commutes with the shuffle; the parameters are those of ``FinalPatchExpand4x`` + ``Conv2d``.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.expand = FinalPatchExpand4x(dim, norm_layer=norm_layer, device=device, dtype=dtype)
        self.proj = nn.Conv2d(dim, out_channels, 1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.expand.expand(x.permute(0, 2, 3, 1)).unflatten(-1, (4, 4, c))  # (B, h, w, 4, 4, C)
        y = self.expand.norm(y).permute(0, 1, 3, 2, 4, 5).reshape(b, 16 * h * w, c)  # (B, 4h*4w, C)
        weight = self.proj.weight.flatten(1).expand(b, -1, -1)
        out = torch.baddbmm(self.proj.bias[:, None], weight, y.transpose(1, 2))  # (B, C_t, 4h*4w)
        return out.view(b, -1, 4 * h, 4 * w)


class LinearHead(nn.Module):
    """A 1x1 conv to the task's channels at the feature's resolution: ``(B, C, h, w) -> (B, C_t, h, w)``."""

    def __init__(
        self,
        dim: int,
        out_channels: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, out_channels, 1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ConvHead(nn.Module):
    """MTMamba++'s head: Conv3x3 (C -> hidden) + BatchNorm + ReLU, then Conv1x1 to the task's channels.

    ``(B, C, h, w) -> (B, C_t, h, w)``; ``hidden`` defaults to ``C // 2``.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        hidden: int | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        hidden = dim // 2 if hidden is None else hidden
        self.conv = nn.Conv2d(dim, hidden, 3, padding=1, **fk)
        self.norm = norm_layer(hidden, **fk)
        self.act = act_layer()
        self.proj = nn.Conv2d(hidden, out_channels, 1, **fk)
        nn.init.trunc_normal_(self.conv.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.norm(self.conv(x))))
